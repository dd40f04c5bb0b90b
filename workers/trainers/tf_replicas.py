"""The TensorFlow trainer on several devices at once (``gpu_count`` > 1): one process, one
``tf.distribute.MirroredStrategy`` replica per device of the gang.

TensorFlow's multi-GPU unit is the process, not the rank: where torch's gang runs N rank
processes (``workers.gang``), a TensorFlow gang runs one trainer that sees all N GPUs
(``CUDA_VISIBLE_DEVICES`` lists the gang's UUIDs) and mirrors the model on each. On simulated
devices (no CUDA) the CPU is split into N logical devices and the same strategy runs over them,
so the replicated path (sharding, the cross-replica sum, checkpoints of mirrored variables,
exact resume) is the one a GPU runs, only slower.

A step: the global batch's rows are cut into N contiguous shards (sizes differ by at most one,
as ``numpy.array_split`` and torch's ``tensor_split`` cut them), each padded with rows of
weight 0 to a full batch's shard, so the step is traced once; each replica accumulates its
shard's micro-batches (the micro-batch is per replica: OOM backoff halves every replica's at
once, in one process) with each row's loss divided by the global batch's row count, and one
``apply_gradients`` inside the replica context sums the N replicas' gradients (Keras's
all-reduce) and applies them once. The step is the full-batch step up to float summation order
(a relative 1e-6 in the final loss; ``tests/integration/test_trainers_tf.py``), and a resumed
run ends with the uninterrupted run's weights, to the bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from app.domain.spec import ModelSpec


def cpu_strategy(replicas: int) -> Any:
    """N replicas on N logical CPU devices (before TensorFlow has run any op)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
    )
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])


def gpu_strategy(replicas: int) -> Any:
    """N replicas on the first N visible GPUs (already configured and made visible)."""
    return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(replicas)])


def shards(
    rows: npt.NDArray[Any], replicas: int, width: int
) -> tuple[list[npt.NDArray[Any]], list[Any]]:
    """Each replica's contiguous part of ``rows``, padded to ``width`` rows, and its row
    weights (1 for a real row, 0 for padding)."""
    parts = np.array_split(rows, replicas)
    padded, weights = [], []
    for part in parts:
        missing = width - len(part)
        pad = np.zeros((missing, *part.shape[1:]), dtype=part.dtype)
        padded.append(np.concatenate([part, pad]))
        weights.append(np.concatenate([np.ones(len(part)), np.zeros(missing)]).astype(np.float32))
    return padded, weights


def weighted_loss_sum(out: Any, target: Any, weight: Any, spec: ModelSpec) -> Any:
    """The sum over rows of each row's loss times its weight (padding rows weigh 0)."""
    out = tf.cast(out, tf.float32)
    if spec.task == "classification":
        per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=out)
    else:
        per_row = tf.reduce_sum(tf.square(out - target), axis=1) / spec.output_dim
    return tf.reduce_sum(per_row * weight)


def replicated_step(
    strategy: Any, model: Any, optimizer: Any, spec: ModelSpec, *, batch: int, micro: int
) -> Callable[[npt.NDArray[Any], npt.NDArray[Any]], float]:
    """One optimizer step over a global batch ``(x, y)`` of at most ``batch`` rows across
    the strategy's replicas; returns the batch's loss (its mean per row). Every shard is
    padded to a full batch's shard, so the step is traced once."""
    replicas = strategy.num_replicas_in_sync
    width = math.ceil(batch / replicas)
    variables = model.trainable_variables

    def replica_step(x: Any, y: Any, weight: Any, batch_rows: Any) -> Any:
        total_grads: list[Any] | None = None
        loss_total = tf.constant(0.0)
        for start in range(0, int(x.shape[0]), micro):
            end = start + micro
            with tf.GradientTape() as tape:
                out = model(x[start:end], training=True)
                loss = weighted_loss_sum(out, y[start:end], weight[start:end], spec) / batch_rows
            grads = tape.gradient(loss, variables)
            if total_grads is None:
                total_grads = list(grads)
            else:
                total_grads = [a + g for a, g in zip(total_grads, grads, strict=True)]
            loss_total += loss
        optimizer.apply_gradients(zip(total_grads or [], variables, strict=True))
        return loss_total

    @tf.function  # type: ignore[untyped-decorator]
    def step(x: Any, y: Any, weight: Any, batch_rows: Any) -> Any:
        per_replica = strategy.run(replica_step, args=(x, y, weight, batch_rows))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def distribute(parts: list[npt.NDArray[Any]]) -> Any:
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(parts[context.replica_id_in_sync_group])
        )

    def run(xb: npt.NDArray[Any], yb: npt.NDArray[Any]) -> float:
        xs, weights = shards(xb, replicas, width)
        ys, _ = shards(yb, replicas, width)
        loss = step(
            distribute(xs), distribute(ys), distribute(weights), tf.constant(float(len(xb)))
        )
        return float(loss)

    return run
