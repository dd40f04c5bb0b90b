"""Real CUDA errors, raised on the GPU, classified by the failure table.

Skipped where no CUDA device is visible; run on a GPU machine with ``pytest -m gpu``. Each error
is raised in a child process: a device-side assert leaves its CUDA context unusable.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from app.domain.failures import classify
from tests.conftest import ROOT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
]

_PROGRAMS = {
    # an index out of range inside a kernel: the user's bug
    "device_side_assert": (
        "import torch; x = torch.zeros(4, device='cuda'); "
        "i = torch.tensor([10], device='cuda'); x[i] = 1; torch.cuda.synchronize()"
    ),
    # more memory than the GPU has
    "oom": "import torch; torch.empty(2**50, dtype=torch.uint8, device='cuda')",
}


def _stderr(program: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    return done.stderr


@pytest.mark.parametrize(
    ("program", "kind"), [("device_side_assert", "user_error"), ("oom", "oom")]
)
def test_real_cuda_errors_are_classified(program: str, kind: str) -> None:
    found = classify(stderr_tail=_stderr(_PROGRAMS[program]))
    assert found.kind == kind and not found.device_suspect, found.why
