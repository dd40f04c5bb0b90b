"""A user's training script that uses the gpufleet SDK (tests run it as a command job).

A linear regression on seeded synthetic data: resumable bit for bit (data order comes from the
step number, the model and optimizer from the checkpoint), micro-batches from the SDK. It leaves
``model.pt`` in the output directory. ``SLOW`` (seconds) sleeps after each step.
"""

from __future__ import annotations

import os
import time

import torch

from workers import sdk

STEPS = int(os.environ.get("STEPS", "12"))


def train(job: sdk.Job) -> dict[str, float]:
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
        sdk.set_rng_state(state["rng"])
        step = state["step"]
    (job.output_dir / "pid").write_text(str(os.getpid()))

    def snapshot() -> dict[str, object]:
        return {
            "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": sdk.rng_state(),
        }

    while step < STEPS:
        if job.should_stop():
            job.stop(snapshot())
        job.check_step(step + 1)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))
        rows = order[: job.batch_size]
        opt.zero_grad()
        total = 0.0
        for chunk in rows.split(job.micro_batch):
            part = torch.nn.functional.mse_loss(model(x[chunk]), y[chunk], reduction="sum")
            (part / job.batch_size).backward()
            total += part.item()
        opt.step()
        step += 1
        loss = total / job.batch_size
        if step % job.checkpoint_every_steps == 0:
            job.save(snapshot())
        job.progress(step, STEPS, loss=loss)
        time.sleep(float(os.environ.get("SLOW", "0")))
    torch.save(model.state_dict(), job.output_dir / "model.pt")
    return {"final_loss": loss}


if __name__ == "__main__":
    sdk.run(train)
