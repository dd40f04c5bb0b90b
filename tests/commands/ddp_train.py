"""A user's data-parallel training script on the SDK (tests run it as a command job of one or
several GPUs): each rank takes its shard of every batch, gradients are summed over the ranks,
so every rank steps the same model as one process would. ``torch.distributed`` meets through
the standard variables gpufleet sets (``init_process_group`` with no address). Rank 0 writes
checkpoints (the SDK) and ``model.pt``; every rank resumes from rank 0's checkpoint.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from workers import sdk

STEPS = int(os.environ.get("STEPS", "12"))


def train(job: sdk.Job) -> dict[str, float]:
    world = job.world_size
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(job.seed)
    x = torch.randn(2048, 8)
    y = x @ torch.linspace(-1, 1, 8).unsqueeze(1) + 0.1 * torch.randn(2048, 1)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step, loss = 0, float("nan")
    state = job.resume()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    print(f"rank {job.rank} of {world} from step {step}", flush=True)

    def snapshot() -> dict[str, object]:
        return {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict()}

    def anyone(flag: bool) -> bool:
        """The ranks stop at the same step, or the others would wait in an all-reduce."""
        if world == 1:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    while step < STEPS:
        if anyone(job.should_stop()):
            job.stop(snapshot())
        job.check_step(step + 1)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))
        mine = order[: job.batch_size].tensor_split(world)[job.rank]
        opt.zero_grad()
        total = torch.zeros(1)
        for chunk in mine.split(job.micro_batch):
            part = torch.nn.functional.mse_loss(model(x[chunk]), y[chunk], reduction="sum")
            (part / job.batch_size).backward()
            total += part.detach()
        if world > 1:
            for p in model.parameters():
                assert p.grad is not None
                dist.all_reduce(p.grad)
            dist.all_reduce(total)
        opt.step()
        step += 1
        loss = total.item() / job.batch_size
        if step % job.checkpoint_every_steps == 0:
            job.save(snapshot())
        job.progress(step, STEPS, loss=loss)
    if job.rank == 0:
        torch.save(model.state_dict(), job.output_dir / "model.pt")
    if world > 1:
        dist.destroy_process_group()
    return {"final_loss": loss}


if __name__ == "__main__":
    sdk.run(train)
