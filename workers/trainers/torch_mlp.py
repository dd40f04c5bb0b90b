"""The built-in PyTorch MLP trainer (``framework: torch``): regression (MSE) or classification
(cross-entropy), Adam, resumable to the bit.

Determinism. The weights come from ``torch.manual_seed(training.seed)``; the order of the rows in
training epoch ``k`` comes from a ``torch.Generator`` seeded with ``(seed, k)`` alone, so a run
resumed mid-epoch continues at the same batch (``position``) of the same order.
``torch.use_deterministic_algorithms(True)`` is on, and CPU training uses one thread (thread
count changes how a CPU matmul sums). A checkpoint holds the model, the optimizer (and the
fp16 grad scaler), the step, the training epoch, the position in it, the running sums behind
``final_loss``, and every RNG state (torch CPU and CUDA, numpy, Python). A resumed run ends with
the same weights, bit for bit, as one that was never interrupted, on the same kind of device.

Gradient accumulation. Each batch of ``batch_size`` rows is split into chunks of
``micro_batch`` rows; each chunk's loss is its *sum* over rows divided by the batch's row count,
and gradients add up over the chunks before one optimizer step. The gradient is the full-batch
gradient up to float summation order, so training does not depend on the micro-batch (the
supervisor halves it after out-of-memory). Measured on CPU, batch 256, micro-batch 64 vs 256,
200 Adam steps: at lr 1e-3 the final losses differ by ~4e-8 relative (weights by < 1e-7); at
lr 1e-2, where Adam oscillates near the minimum and amplifies rounding, by ~6e-5. Bit-exact
resume holds only at the same micro-batch: a resume after an out-of-memory halving is equal to
float rounding, not to the bit.

``final_loss`` is the mean of the per-step training losses over the last training epoch this
run reached (a partial one when ``training.max_steps`` ends it mid-epoch); the sums are in the
checkpoint, so a resumed run reports the same value. Classification also reports ``accuracy``
of the final model over the whole dataset.

On a GPU: ``mixed_precision`` trains under ``torch.autocast`` in bf16 where the GPU supports it,
else fp16 with a ``GradScaler``; ``gpu_memory_fraction`` caps this process's allocator
(``torch.cuda.set_per_process_memory_fraction``); peak allocated memory is reported at each
checkpoint and at the end. On the CPU both settings are no-ops.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.domain.spec import JobSpec, ModelSpec
from workers.trainers import checkpoints, distributed
from workers.trainers.context import TrainContext
from workers.trainers.data import Dataset, load_dataset
from workers.trainers.errors import StopRequested, WorkerError

_SEED_MIX = 1_000_003


def build_model(spec: ModelSpec) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = spec.input_dim
    for units in spec.hidden_units:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, spec.output_dim))
    return nn.Sequential(*layers)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the raw bytes of each parameter, in ``model.parameters()`` order."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def epoch_order(rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of training epoch ``epoch``: depends on (seed, epoch) and nothing else."""
    generator = torch.Generator().manual_seed((seed * _SEED_MIX + epoch) % 2**63)
    return torch.randperm(rows, generator=generator)


# -- RNG state in weights_only form (tensors and primitives only) --------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, words, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "words": torch.tensor(words, dtype=torch.int64),
            "gauss": gauss_next,
        },
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))


# -- one run's mutable training state ------------------------------------------------------


@dataclass
class _Run:
    model: nn.Sequential
    optimizer: torch.optim.Adam
    scaler: torch.amp.GradScaler | None
    step: int = 0  #: optimizer steps done
    epoch: int = 0  #: training epoch (0-based) the next step belongs to
    position: int = 0  #: batches of that epoch already done
    loss_sum: float = 0.0  #: sum of per-step losses in the current training epoch
    loss_steps: int = 0

    @classmethod
    def fresh(cls, spec: JobSpec, device: torch.device, fp16: bool) -> _Run:
        seed = spec.training.seed
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        model = build_model(spec.model).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.training.learning_rate)
        scaler = torch.amp.GradScaler("cuda") if fp16 else None
        return cls(model, optimizer, scaler)

    @classmethod
    def resume(cls, spec: JobSpec, device: torch.device, fp16: bool, state: dict[str, Any]) -> _Run:
        run = cls.fresh(spec, device, fp16)
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        run.step, run.epoch, run.position = state["step"], state["epoch"], state["position"]
        run.loss_sum, run.loss_steps = state["loss_sum"], state["loss_steps"]
        set_rng_state(state["rng"], device)
        return run

    def state(self, device: torch.device, micro_batch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "loss_sum": self.loss_sum,
            "loss_steps": self.loss_steps,
            "rng": rng_state(device),
            "micro_batch": micro_batch,
        }


def _batch_loss(out: torch.Tensor, target: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """The loss summed over the rows of a chunk (each row's loss a mean over its outputs)."""
    out = out.float()
    if spec.task == "classification":
        return F.cross_entropy(out, target, reduction="sum")
    return F.mse_loss(out, target, reduction="sum") / spec.output_dim


def _configure(ctx: TrainContext, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Determinism, threads and GPU memory; returns (autocast dtype or None, fp16 scaler?)."""
    torch.use_deterministic_algorithms(True)
    if device.type == "cpu":
        torch.set_num_threads(1)
        return None, False
    if not torch.cuda.is_available():
        raise WorkerError("launched on cuda, but torch sees no usable GPU on this worker")
    torch.backends.cudnn.benchmark = False
    torch.cuda.set_per_process_memory_fraction(ctx.spec.resources.gpu_memory_fraction)
    torch.cuda.reset_peak_memory_stats()
    if not ctx.spec.training.mixed_precision:
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def _tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(data.x), torch.from_numpy(data.y)


def train(ctx: TrainContext) -> dict[str, Any]:
    # cuBLAS needs this before its first handle for deterministic algorithms.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    ranks = distributed.Ranks.from_env()
    device = distributed.start(ranks, torch.device(ctx.device))
    try:
        return _train(ctx, ranks, device)
    finally:
        distributed.stop(ranks)


def _train(ctx: TrainContext, ranks: distributed.Ranks, device: torch.device) -> dict[str, Any]:
    """Train; with several ranks (a gang), DistributedDataParallel: each rank takes its shard
    of every batch, each shard's loss is its row sum over the *global* batch's row count times
    the ranks (DDP averages the gradients), so the step is the full-batch step, as on one
    process, up to float summation order. Rank 0 writes checkpoints and the model; every rank
    resumes from the same checkpoint, so the positions and RNG states are the same on all."""
    spec, training = ctx.spec, ctx.spec.training
    amp_dtype, fp16 = _configure(ctx, device)
    x_all, y_all = _tensors(load_dataset(spec.model, spec.data, ctx.data_root))
    rows, batch, micro = x_all.shape[0], ctx.batch_size, ctx.micro_batch
    steps_per_epoch = math.ceil(rows / batch)
    total = training.epochs * steps_per_epoch
    if training.max_steps is not None:
        total = min(total, training.max_steps)

    def restore(state: dict[str, Any]) -> _Run:
        return _Run.resume(spec, device, fp16, state)

    run = ctx.load_checkpoint(restore) or _Run.fresh(spec, device, fp16)
    net: nn.Module = run.model
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(run.model)
    ctx.log(
        f"torch mlp on {device}: {rows} rows, {total} steps, batch {batch} = "
        f"{ctx.accumulation} x micro-batch {micro}, from step {run.step}"
        + (f", rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else "")
    )

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=amp_dtype)

    def optimizer_step(xb: torch.Tensor, yb: torch.Tensor) -> float:
        run.optimizer.zero_grad(set_to_none=True)
        batch_rows = xb.shape[0]
        xs, ys = distributed.shard(xb, ranks), distributed.shard(yb, ranks)
        loss_total = torch.zeros((), device=device)
        # at least one pass, even on an empty shard: every rank must join the all-reduce
        starts = list(range(0, max(xs.shape[0], 1), micro))
        for start in starts:
            xc = xs[start : start + micro].to(device, non_blocking=True)
            yc = ys[start : start + micro].to(device, non_blocking=True)
            last = start == starts[-1]
            sync = contextlib.nullcontext() if last or ranks.world == 1 else net.no_sync()  # type: ignore[operator]
            with sync:
                with autocast():
                    loss = _batch_loss(net(xc), yc, spec.model) / batch_rows
                scaled = loss * ranks.world  # DDP averages over the ranks
                if run.scaler is not None:
                    torch.autograd.backward(run.scaler.scale(scaled))
                else:
                    torch.autograd.backward(scaled)
            loss_total += loss.detach()
        distributed.total(loss_total, ranks)
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        return float(loss_total)

    def checkpoint() -> None:
        if not ranks.leader:
            return
        ctx.save_checkpoint(run.state(device, micro))
        if device.type == "cuda":
            ctx.report_gpu_memory(torch.cuda.max_memory_allocated())

    started, start_step = time.monotonic(), run.step
    while run.step < total:
        if run.position >= steps_per_epoch:
            run.epoch, run.position = run.epoch + 1, 0
        if run.position == 0:
            run.loss_sum, run.loss_steps = 0.0, 0
        order = epoch_order(rows, training.seed, run.epoch)
        while run.position < steps_per_epoch and run.step < total:
            if distributed.any_rank(ctx.should_stop(), ranks, device):
                if ctx.last_saved_step != run.step and run.step > 0:
                    checkpoint()
                raise StopRequested
            ctx.faults.check_step(run.step + 1, micro)
            index = order[run.position * batch : (run.position + 1) * batch]
            loss = optimizer_step(x_all[index], y_all[index])
            run.step, run.position = run.step + 1, run.position + 1
            run.loss_sum, run.loss_steps = run.loss_sum + loss, run.loss_steps + 1
            if run.step % training.checkpoint_every_steps == 0:
                checkpoint()
            elapsed = time.monotonic() - started
            speed = (run.step - start_step) * batch / elapsed if elapsed > 0 else None
            ctx.report(run.step, total, run.epoch + 1, loss=loss, samples_per_sec=speed)
            ctx.faults.after_step()

    return _finish(ctx, run, device, x_all, y_all, write=ranks.leader)


def _finish(
    ctx: TrainContext,
    run: _Run,
    device: torch.device,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    write: bool = True,
) -> dict[str, Any]:
    path = ctx.checkpoint_dir / f"model-e{ctx.epoch}.pt"
    state = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}

    def write_model(fileobj: BinaryIO) -> None:
        torch.save(state, fileobj)

    if write:
        checkpoints.atomic_write_file(path, write_model)
    metrics: dict[str, float] = {"steps": float(run.step)}
    if ctx.spec.model.task == "classification":
        metrics["accuracy"] = _accuracy(run.model, x, y, ctx.micro_batch, device)
    if device.type == "cuda":
        ctx.report_gpu_memory(torch.cuda.max_memory_allocated())
    final_loss = run.loss_sum / run.loss_steps if run.loss_steps else None
    return {
        "final_loss": final_loss,
        "model_path": str(path),
        "weights_sha256": weights_sha256(run.model),
        "metrics": metrics,
    }


def _accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int, device: torch.device
) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            out = model(x[start : start + chunk].to(device))
            correct += int((out.argmax(dim=1).cpu() == y[start : start + chunk]).sum())
    return correct / x.shape[0]
