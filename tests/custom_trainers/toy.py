"""A small custom trainer: linear regression in PyTorch through the ``TrainContext`` API.

It shows what a custom entrypoint must do to be a good citizen of the queue: resume from
``ctx.load_checkpoint()``, checkpoint every ``checkpoint_every_steps``, stop with a checkpoint
when ``ctx.should_stop()``, keep the effective batch while the micro-batch changes, report
progress, and call the fault-injection hooks. Its data order depends on the step alone, so a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from workers.trainers.context import TrainContext
from workers.trainers.errors import StopRequested


def train(ctx: TrainContext) -> dict[str, Any]:
    torch.set_num_threads(1)
    spec = ctx.spec
    dim, seed = spec.model.input_dim, spec.training.seed
    data_gen = torch.Generator().manual_seed(spec.data.seed)
    x = torch.randn(spec.data.samples, dim, generator=data_gen)
    y = x @ torch.randn(dim, 1, generator=data_gen) + 0.5

    torch.manual_seed(seed)
    model = torch.nn.Linear(dim, 1)
    opt = torch.optim.SGD(model.parameters(), lr=spec.training.learning_rate)
    step = 0
    state = ctx.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]

    def checkpoint() -> None:
        ctx.save_checkpoint(
            {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict()}
        )

    total = spec.training.max_steps or 100
    loss_value = None
    while step < total:
        if ctx.should_stop():
            if step > 0 and ctx.last_saved_step != step:
                checkpoint()
            raise StopRequested
        ctx.faults.check_step(step + 1, ctx.micro_batch)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + step))
        index = order[: ctx.batch_size]
        opt.zero_grad()
        loss_sum = torch.zeros(())
        for chunk in torch.split(index, ctx.micro_batch):
            loss = ((model(x[chunk]) - y[chunk]) ** 2).sum() / len(index)
            loss.backward()
            loss_sum += loss.detach()
        opt.step()
        step += 1
        loss_value = float(loss_sum)
        if step % spec.training.checkpoint_every_steps == 0:
            checkpoint()
        ctx.report(step, total, epoch=1, loss=loss_value)
        ctx.faults.after_step()

    path = ctx.checkpoint_dir / f"toy-e{ctx.epoch}.pt"
    torch.save(model.state_dict(), path)
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().contiguous().numpy().tobytes())
    return {"final_loss": loss_value, "model_path": str(path), "weights_sha256": digest.hexdigest()}
