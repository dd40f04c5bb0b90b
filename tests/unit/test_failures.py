"""The failure table: real error text from PyTorch, TensorFlow, NCCL and the driver, classified.

Each row of ``app.domain.failures.PATTERNS`` is reached by at least one example here, so a new
row comes with its example.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.domain import failures
from app.domain.failures import classify, classify_exception
from tests.trainer_support import launch, run_trainer, spec
from workers.trainers.errors import InjectedTransientError, UserError, WorkerError
from workers.trainers.main import failure_message
from workers.trainers.protocol import EXIT_INFRA, EXIT_OOM, EXIT_USER_ERROR

_ASYNC_NOTE = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\nFor debugging consider passing "
    "CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)
_RUNTIME = ("RuntimeError", "Exception", "BaseException", "object")

#: (type names of the exception, message, stderr tail) -> (kind, device suspect)
EXAMPLES: list[tuple[str, tuple[str, ...], str, str, str, bool]] = [
    # id, type names, message, stderr tail, kind, suspect
    (
        "torch-oom",
        ("OutOfMemoryError", *_RUNTIME),
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.15 "
        "GiB of which 6.69 MiB is free. Including non-PyTorch memory, this process has 79.13 GiB "
        "memory in use. Of the allocated memory 78.46 GiB is allocated by PyTorch, and 190.84 "
        "MiB is reserved by PyTorch but unallocated.",
        "",
        "oom",
        False,
    ),
    ("cuda-error-oom", _RUNTIME, "CUDA error: out of memory" + _ASYNC_NOTE, "", "oom", False),
    (
        "cublas-alloc",
        _RUNTIME,
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "",
        "oom",
        False,
    ),
    (
        "tf-oom",
        ("ResourceExhaustedError", "OpError", "Exception", "BaseException", "object"),
        "{{function_node __wrapped__MatMul_device_/job:localhost/replica:0/task:0/device:GPU:0}} "
        "OOM when allocating tensor with shape[8192,8192] and type float on "
        "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc [Op:MatMul]",
        "",
        "oom",
        False,
    ),
    (
        "command-oom-traceback",
        (),
        "",
        'Traceback (most recent call last):\n  File "train.py", line 40, in <module>\n'
        "    loss.backward()\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
        "2.00 GiB.",
        "oom",
        False,
    ),
    (
        "xla-oom",
        (),
        "",
        "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying "
        "to allocate 17179869184 bytes.",
        "oom",
        False,
    ),
    (
        "device-side-assert",
        _RUNTIME,
        "CUDA error: device-side assert triggered" + _ASYNC_NOTE,
        "../aten/src/ATen/native/cuda/Loss.cu:240: nll_loss_forward_reduce_cuda_kernel_2d: "
        "block: [0,0,0], thread: [5,0,0] Assertion `t >= 0 && t < n_classes` failed.",
        "user_error",
        False,
    ),
    (
        "device-side-assert-through-nccl",
        ("DistBackendError", *_RUNTIME),
        "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, unhandled "
        "cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.19.3\n"
        "ncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\n"
        "Cuda failure 'device-side assert triggered'",
        "",
        "user_error",
        False,
    ),
    (
        "illegal-memory-access",
        _RUNTIME,
        "CUDA error: an illegal memory access was encountered" + _ASYNC_NOTE,
        "",
        "infra",
        True,
    ),
    (
        "unspecified-launch-failure",
        _RUNTIME,
        "CUDA error: unspecified launch failure" + _ASYNC_NOTE,
        "",
        "infra",
        True,
    ),
    (
        "ecc",
        _RUNTIME,
        "CUDA error: uncorrectable ECC error encountered" + _ASYNC_NOTE,
        "",
        "infra",
        True,
    ),
    (
        "tf-ecc",
        ("InternalError", "OpError", "Exception", "BaseException", "object"),
        "Failed to memcpy from device to host: CUDA_ERROR_ECC_UNCORRECTABLE: uncorrectable ECC "
        "error encountered",
        "",
        "infra",
        True,
    ),
    (
        "busy-or-unavailable",
        _RUNTIME,
        "CUDA error: CUDA-capable device(s) is/are busy or unavailable" + _ASYNC_NOTE,
        "",
        "infra",
        True,
    ),
    (
        "xid-in-dmesg",
        (),
        "",
        "NVRM: Xid (PCI:0000:3b:00): 74, pid=2184, NVLink: fatal error detected on link 4",
        "infra",
        True,
    ),
    (
        "fallen-off-the-bus",
        (),
        "",
        "NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.",
        "infra",
        True,
    ),
    (
        "gpu-is-lost",
        (),
        "",
        "Unable to determine the device handle for GPU0000:3B:00.0: GPU is lost.  Reboot the "
        "system to recover this GPU",
        "infra",
        True,
    ),
    (
        "nccl-unhandled-cuda",
        ("DistBackendError", *_RUNTIME),
        "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, unhandled "
        "cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.19.3\n"
        "ncclUnhandledCudaError: Call to CUDA function failed.",
        "",
        "infra",
        True,
    ),
    (
        "nccl-system",
        ("DistBackendError", *_RUNTIME),
        "NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, unhandled system "
        "error (run with NCCL_DEBUG=INFO for details), NCCL version 2.18.1\nncclSystemError: "
        "System call (e.g. socket, malloc) or external library call failed or device error.",
        "",
        "infra",
        True,
    ),
    (
        "nccl-invalid-usage",
        ("DistBackendError", *_RUNTIME),
        "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1269, invalid usage "
        "(run with NCCL_DEBUG=WARN for details), NCCL version 2.14.3\nncclInvalidUsage: This "
        "usually reflects invalid usage of NCCL library.",
        "",
        "user_error",
        False,
    ),
    (
        "user-error",
        ("UserError", "Exception", "BaseException", "object"),
        "data.path 'x.npz' not found under the data root",
        "",
        "user_error",
        False,
    ),
    (
        "user-error-quoting-a-hardware-word",
        ("UserError", "Exception", "BaseException", "object"),
        "data.path 'runs/uncorrectable/x.npz' not found under the data root",
        "",
        "user_error",
        False,
    ),
    (
        "tf-oom-by-type-only",
        ("ResourceExhaustedError", "OpError", "Exception", "BaseException", "object"),
        "failed to allocate memory [Op:AddV2]",
        "",
        "oom",
        False,
    ),
    (
        "disk-full",
        ("OSError", "Exception", "BaseException", "object"),
        "[Errno 28] No space left on device",
        "",
        "infra",
        False,
    ),
    (
        "shape-mismatch",
        ("ValueError", "Exception", "BaseException", "object"),
        "Expected input batch_size (32) to match target batch_size (64).",
        "",
        "user_error",
        False,
    ),
    ("segfault", (), "", "Segmentation fault (core dumped)", "user_error", False),
    (
        "rendezvous-port-taken",
        ("DistNetworkError", "DistError", "RuntimeError", "Exception", "BaseException", "object"),
        "The server socket has failed to listen on any local network address. port: 29500, "
        "useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use",
        "",
        "infra",
        False,
    ),
    (
        "rendezvous-port-taken-in-a-commands-stderr",
        (),
        "",
        "torch.distributed.DistNetworkError: The server socket has failed to listen on any "
        "local network address. port: 29500, useIpv6: false, code: -98, name: EADDRINUSE",
        "infra",
        False,
    ),
]


@pytest.mark.parametrize(
    ("types", "message", "tail", "kind", "suspect"),
    [e[1:] for e in EXAMPLES],
    ids=[e[0] for e in EXAMPLES],
)
def test_examples(
    types: tuple[str, ...], message: str, tail: str, kind: str, suspect: bool
) -> None:
    found = classify(type_names=types, message=message, stderr_tail=tail)
    assert (found.kind, found.device_suspect) == (kind, suspect), found.why


def test_every_row_has_an_example_and_its_own_reason() -> None:
    whys = [p.why for p in failures.PATTERNS]
    assert len(set(whys)) == len(whys)
    reached = {classify(type_names=e[1], message=e[2], stderr_tail=e[3]).why for e in EXAMPLES}
    assert reached == {*whys, failures.DEFAULT.why}


def test_only_the_tail_of_a_long_stderr_is_read() -> None:
    # An old warning far above the end is not the error that ended the command.
    noise = ["step ok"] * failures.STDERR_TAIL_LINES
    tail = "\n".join(["NVRM: Xid 13 earlier", *noise, "ValueError: bad label"])
    assert classify(stderr_tail=tail).kind == "user_error"
    assert classify(stderr_tail="\n".join([*noise[1:], "Xid 79"])).device_suspect


@pytest.mark.parametrize(
    ("exc", "kind", "suspect"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "oom", False),
        (MemoryError(), "oom", False),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), "infra", True),
        (InjectedTransientError("x"), "infra", False),
        (WorkerError("no usable GPU"), "infra", False),
        (FileNotFoundError("gone"), "infra", False),
        (UserError("bad"), "user_error", False),
        (SystemExit(3), "user_error", False),
    ],
)
def test_real_exceptions(exc: BaseException, kind: str, suspect: bool) -> None:
    found = classify_exception(exc)
    assert (found.kind, found.device_suspect) == (kind, suspect)


def test_numpy_allocation_failure_is_oom() -> None:
    # numpy raises a private MemoryError subclass; the MRO names carry it.
    with pytest.raises(MemoryError) as info:
        np.empty(2**47, dtype=np.float64)  # 1 PiB
    assert classify_exception(info.value).kind == "oom"


@pytest.mark.parametrize(
    ("exc", "code", "suspect"),
    [
        (RuntimeError("CUDA error: unspecified launch failure"), EXIT_INFRA, True),
        (RuntimeError("CUDA error: device-side assert triggered"), EXIT_USER_ERROR, False),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), EXIT_OOM, False),
        (OSError("disk"), EXIT_INFRA, False),
    ],
)
def test_trainer_exit_code_and_suspect_flag(exc: BaseException, code: int, suspect: bool) -> None:
    failure, exit_code = failure_message(exc)
    assert (exit_code, failure.device_suspect) == (code, suspect)


def test_an_injected_gpu_fault_ends_the_trainer_infra_with_a_suspect_device(
    tmp_path: Path,
) -> None:
    # Given a job whose 5th step raises the error CUDA raises on an uncorrectable ECC error
    job = spec(faults={"fail_at_step": 5, "fail_with": "gpu_fault"})
    # When the trainer runs it as the supervisor would
    out = run_trainer(launch(tmp_path, job), tmp_path)
    # Then it exits infra and tells the supervisor the device is suspect
    assert out.code == EXIT_INFRA, out.stderr
    assert out.failure.kind == "infra" and out.failure.device_suspect
    assert "uncorrectable ECC error" in out.failure.message
