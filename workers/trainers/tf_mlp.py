"""The built-in TensorFlow/Keras MLP trainer (``framework: tensorflow``): the same model, loss,
optimizer (Adam), data order rule, gradient accumulation and checkpoints as ``torch_mlp``.

A custom training loop (``tf.GradientTape``) so that micro-batches accumulate exactly as in
torch: each chunk's loss is its sum over rows divided by the batch's row count, the gradients
add up, and one ``apply_gradients`` follows the whole batch.

Determinism: ``tf.keras.utils.set_random_seed``, ``tf.config.experimental.
enable_op_determinism()``, one CPU thread (intra- and inter-op), and the row order of training
epoch ``k`` from numpy's generator seeded with ``(seed, k)``. Checkpoints are
``tf.train.Checkpoint`` (model, optimizer with its slots and iteration count, step, training
epoch, position, the sums behind ``final_loss``) written into a temporary directory that is then
renamed ``e<lease epoch>-s<step>``.

Resume is bit-exact on the CPU (TensorFlow 2.21, Keras 3.15): a run killed after its second
checkpoint and resumed under a new lease ends with the same ``weights_sha256`` and the same
``final_loss`` as an uninterrupted one (``tests/integration/test_trainers_tf.py`` asserts
it). Micro-batch 64 vs 256 differs by float rounding only, as in torch.

``final_loss`` is the mean per-step training loss over the last training epoch reached;
``weights_sha256`` is over each trainable variable's bytes in ``model.trainable_variables``
order (a Keras kernel is (in, out), a torch weight (out, in): the two never hash alike). The
final weights go to ``<checkpoint_dir>/model-e<lease epoch>.weights.h5``.

On a GPU: ``gpu_memory_fraction`` becomes a logical-device memory limit (the GPU's total memory
read through NVML; without NVML, memory growth instead), ``mixed_precision`` sets the Keras
``mixed_bfloat16`` policy on GPUs that have bf16 (compute capability 8.0+; elsewhere it is
ignored with a log line, fp16 would need loss scaling inside the accumulation), and the peak
memory is reported (the largest of the replicas' GPUs). None of this is exercised without a GPU.

Several GPUs (``gpu_count`` > 1): one process, a MirroredStrategy replica per device
(``tf_replicas``); on simulated devices, as many logical CPU devices.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the job's log is for the job

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from app.domain.spec import JobSpec, ModelSpec
from workers.trainers import checkpoints, tf_replicas
from workers.trainers.context import TrainContext
from workers.trainers.data import load_dataset
from workers.trainers.errors import StopRequested, WorkerError

CHECKPOINT_PREFIX = "ckpt"


def build_model(spec: ModelSpec) -> Any:
    layers: list[Any] = [tf.keras.Input(shape=(spec.input_dim,))]
    layers += [tf.keras.layers.Dense(units, activation="relu") for units in spec.hidden_units]
    layers.append(tf.keras.layers.Dense(spec.output_dim, dtype="float32"))
    return tf.keras.Sequential(layers)


def weights_sha256(model: Any) -> str:
    digest = hashlib.sha256()
    for variable in model.trainable_variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def epoch_order(rows: int, seed: int, epoch: int) -> npt.NDArray[np.int64]:
    """The row order of training epoch ``epoch``: depends on (seed, epoch) and nothing else."""
    return np.random.default_rng([seed % 2**63, epoch]).permutation(rows)


@dataclass
class _Run:
    model: Any
    optimizer: Any
    checkpoint: Any  #: tf.train.Checkpoint over everything below
    step: Any  #: tf.Variable int64: optimizer steps done
    epoch: Any  #: training epoch (0-based) the next step belongs to
    position: Any  #: batches of that epoch already done
    loss_sum: Any  #: tf.Variable float64
    loss_steps: Any

    @classmethod
    def fresh(cls, spec: JobSpec, strategy: Any) -> _Run:
        """A new run; the model and optimizer live in ``strategy``'s scope (mirrored on each
        replica; the default strategy: one device)."""
        tf.keras.utils.set_random_seed(spec.training.seed % 2**32)
        with strategy.scope():
            model = build_model(spec.model)
            optimizer = tf.keras.optimizers.Adam(learning_rate=spec.training.learning_rate)
            optimizer.build(model.trainable_variables)  # slots exist before a restore
        counters = {
            name: tf.Variable(0, dtype=tf.int64, trainable=False)
            for name in ("step", "epoch", "position", "loss_steps")
        }
        loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, loss_sum=loss_sum, **counters
        )
        return cls(model, optimizer, checkpoint, loss_sum=loss_sum, **counters)

    @classmethod
    def resume(cls, spec: JobSpec, strategy: Any, path: Path) -> _Run:
        run = cls.fresh(spec, strategy)
        status = run.checkpoint.read(str(path / CHECKPOINT_PREFIX))
        status.assert_existing_objects_matched()
        return run

    def write(self, directory: Path) -> None:
        self.checkpoint.write(str(directory / CHECKPOINT_PREFIX))


def _loss_sum(out: Any, target: Any, spec: ModelSpec) -> Any:
    out = tf.cast(out, tf.float32)
    if spec.task == "classification":
        return tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=out)
        )
    return tf.reduce_sum(tf.square(out - target)) / spec.output_dim


def _gpu_total_bytes(index: int) -> int | None:
    """The total memory of the ``index``-th visible GPU, read through NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            listed = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
            visible = listed[index].strip() if index < len(listed) else str(index)
            if visible.startswith("GPU-"):
                handle = pynvml.nvmlDeviceGetHandleByUUID(visible.encode())
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible or index))
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML here: fall back to memory growth
        return None


@dataclass(frozen=True)
class _Placement:
    on_gpu: bool
    replicas: int  #: the job's gpu_count: one replica per device
    strategy: Any  #: MirroredStrategy over the replicas' devices, or the default strategy

    def peak_memory(self) -> int:
        """The largest peak of the replicas' GPUs (each replica's memory must fit its GPU)."""
        return max(
            int(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"])
            for i in range(self.replicas)
        )


def _configure(ctx: TrainContext) -> _Placement:
    """Threads, determinism, devices, GPU memory and precision, before TensorFlow runs any
    op; with ``gpu_count`` > 1, a replica per device (``tf_replicas``)."""
    tf.config.experimental.enable_op_determinism()
    replicas = ctx.spec.resources.gpu_count
    gpus = tf.config.list_physical_devices("GPU")
    if ctx.device == "cuda" and len(gpus) < replicas:
        raise WorkerError(
            f"launched on cuda for {replicas} GPU(s), but TensorFlow sees {len(gpus)} usable "
            "GPU(s) on this worker"
        )
    if ctx.device != "cuda":
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        if replicas == 1:
            return _Placement(False, 1, tf.distribute.get_strategy())
        return _Placement(False, replicas, tf_replicas.cpu_strategy(replicas))
    mine = gpus[:replicas]
    tf.config.set_visible_devices(mine, "GPU")
    for index, gpu in enumerate(mine):
        total = _gpu_total_bytes(index)
        if total is None:
            tf.config.experimental.set_memory_growth(gpu, True)
        else:
            limit_mb = int(total * ctx.spec.resources.gpu_memory_fraction) // 2**20
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit_mb)]
            )
    if ctx.spec.training.mixed_precision:
        capability = tf.config.experimental.get_device_details(mine[0]).get("compute_capability")
        if capability is not None and capability >= (8, 0):
            tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
        else:
            ctx.log("mixed_precision ignored: this GPU has no bf16")
    if replicas == 1:
        return _Placement(True, 1, tf.distribute.get_strategy())
    return _Placement(True, replicas, tf_replicas.gpu_strategy(replicas))


def train(ctx: TrainContext) -> dict[str, Any]:
    spec, training = ctx.spec, ctx.spec.training
    placement = _configure(ctx)
    on_gpu = placement.on_gpu
    data = load_dataset(spec.model, spec.data, ctx.data_root)
    rows, batch, micro = len(data), ctx.batch_size, ctx.micro_batch
    steps_per_epoch = math.ceil(rows / batch)
    total = training.epochs * steps_per_epoch
    if training.max_steps is not None:
        total = min(total, training.max_steps)

    strategy = placement.strategy
    run = ctx.load_checkpoint_dir(lambda path: _Run.resume(spec, strategy, path))
    run = run or _Run.fresh(spec, strategy)
    ctx.log(
        f"tensorflow mlp on {'gpu' if on_gpu else 'cpu'}: {rows} rows, {total} steps, batch "
        f"{batch} = {ctx.accumulation} x micro-batch {micro}, from step {int(run.step)}"
        + (
            f", {placement.replicas} replicas (MirroredStrategy over "
            f"{', '.join(d.rsplit('device:', 1)[-1] for d in strategy.extended.worker_devices)})"
            if placement.replicas > 1
            else ""
        )
    )
    y_dtype = tf.int64 if spec.model.task == "classification" else tf.float32
    y_shape = [None] if spec.model.task == "classification" else [None, spec.model.output_dim]
    variables = run.model.trainable_variables

    @tf.function(  # type: ignore[untyped-decorator]
        input_signature=[
            tf.TensorSpec([None, spec.model.input_dim], tf.float32),
            tf.TensorSpec(y_shape, y_dtype),
            tf.TensorSpec([], tf.float32),
        ],
        reduce_retracing=True,
    )
    def chunk_gradients(x: Any, y: Any, batch_rows: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = _loss_sum(run.model(x, training=True), y, spec.model) / batch_rows
        return loss, tape.gradient(loss, variables)

    def local_step(xb: Any, yb: Any) -> float:
        batch_rows = tf.constant(float(xb.shape[0]))
        total_grads: list[Any] | None = None
        loss_total = 0.0
        for start in range(0, xb.shape[0], micro):
            loss, grads = chunk_gradients(
                xb[start : start + micro], yb[start : start + micro], batch_rows
            )
            loss_total += float(loss)
            if total_grads is None:
                total_grads = list(grads)
            else:
                total_grads = [a + g for a, g in zip(total_grads, grads, strict=True)]
        run.optimizer.apply_gradients(zip(total_grads or [], variables, strict=True))
        return loss_total

    optimizer_step = (
        tf_replicas.replicated_step(
            strategy, run.model, run.optimizer, spec.model, batch=batch, micro=micro
        )
        if placement.replicas > 1
        else local_step
    )

    def checkpoint() -> None:
        ctx.save_checkpoint_dir(int(run.step), run.write)
        if on_gpu:
            ctx.report_gpu_memory(placement.peak_memory())

    started, start_step = time.monotonic(), int(run.step)
    while int(run.step) < total:
        if int(run.position) >= steps_per_epoch:
            run.epoch.assign_add(1)
            run.position.assign(0)
        if int(run.position) == 0:
            run.loss_sum.assign(0.0)
            run.loss_steps.assign(0)
        order = epoch_order(rows, training.seed, int(run.epoch))
        while int(run.position) < steps_per_epoch and int(run.step) < total:
            step, position = int(run.step), int(run.position)
            if ctx.should_stop():
                if ctx.last_saved_step != step and step > 0:
                    checkpoint()
                raise StopRequested
            ctx.faults.check_step(step + 1, micro)
            index = order[position * batch : (position + 1) * batch]
            loss = optimizer_step(data.x[index], data.y[index])
            run.step.assign_add(1)
            run.position.assign_add(1)
            run.loss_sum.assign_add(loss)
            run.loss_steps.assign_add(1)
            if (step + 1) % training.checkpoint_every_steps == 0:
                checkpoint()
            elapsed = time.monotonic() - started
            speed = (step + 1 - start_step) * batch / elapsed if elapsed > 0 else None
            ctx.report(step + 1, total, int(run.epoch) + 1, loss=loss, samples_per_sec=speed)
            ctx.faults.after_step()

    return _finish(ctx, run, placement, data.x, data.y)


def _finish(ctx: TrainContext, run: _Run, placement: _Placement, x: Any, y: Any) -> dict[str, Any]:
    path = ctx.checkpoint_dir / f"model-e{ctx.epoch}.weights.h5"
    checkpoints.atomic_write_path(path, lambda tmp: run.model.save_weights(str(tmp)))
    metrics: dict[str, float] = {"steps": float(int(run.step))}
    if ctx.spec.model.task == "classification":
        correct = 0
        for start in range(0, len(x), ctx.micro_batch):
            out = run.model(x[start : start + ctx.micro_batch], training=False)
            correct += int(np.sum(np.argmax(out, axis=1) == y[start : start + ctx.micro_batch]))
        metrics["accuracy"] = correct / len(x)
    if placement.on_gpu:
        ctx.report_gpu_memory(placement.peak_memory())
    steps = int(run.loss_steps)
    return {
        "final_loss": float(run.loss_sum.numpy()) / steps if steps else None,
        "model_path": str(path),
        "weights_sha256": weights_sha256(run.model),
        "metrics": metrics,
    }
