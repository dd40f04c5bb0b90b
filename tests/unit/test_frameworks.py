"""Workers say what they can run: detection without importing, the setting, framework queues."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.domain import routing
from app.domain.spec import JobSpec
from tests.conftest import ROOT
from workers import frameworks
from workers.frameworks import FrameworksError, installed, offered


def test_tensorflow_jobs_wait_in_their_own_queues_torch_and_entrypoints_in_the_plain_ones() -> None:
    def queue(**body: object) -> str:
        return JobSpec.model_validate({"resources": {"memory_gb": 20}, **body}).queue

    assert queue(framework="torch") == "gpu.any.24"
    assert queue(entrypoint="tests.custom_trainers.toy:train") == "gpu.any.24"
    assert queue(framework="tensorflow") == "gpu.any.24.tensorflow"


def test_a_device_consumes_only_the_queues_of_its_frameworks() -> None:
    # The plain (torch) names are what they always were
    assert routing.device_queues("t4", 15.0) == routing.device_queues("t4", 15.0, ["torch"])
    assert routing.device_queues("t4", 15.0, ["torch", "tensorflow"]) == [
        "gpu.T4.16",
        "gpu.any.16",
        "gpu.T4.16.tensorflow",
        "gpu.any.16.tensorflow",
        "gpu.T4.8",
        "gpu.any.8",
        "gpu.T4.8.tensorflow",
        "gpu.any.8.tensorflow",
    ]
    assert routing.device_queues("t4", 15.0, ["tensorflow"]) == [
        "gpu.T4.16.tensorflow",
        "gpu.any.16.tensorflow",
        "gpu.T4.8.tensorflow",
        "gpu.any.8.tensorflow",
    ]
    assert routing.device_queues("t4", 15.0, []) == []


def test_installed_asks_find_spec_and_metadata() -> None:
    found = installed(importable=lambda name: name == "torch", version=lambda name: "2.13.0")
    assert found == {"torch": "2.13.0"}
    assert installed(importable=lambda name: False) == {}


@pytest.mark.tensorflow
def test_detection_imports_no_framework() -> None:
    # Given this environment (torch and tensorflow installed)
    code = (
        "import sys; from workers.frameworks import installed; found = installed(); "
        "print(sorted(found)); "
        "print([m for m in ('torch', 'tensorflow') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    # Then both are found, and neither was imported to find it
    assert done.stdout.splitlines() == ["['tensorflow', 'torch']", "[]"]


@pytest.mark.tensorflow
def test_versions_come_from_the_distribution_that_installed_the_package() -> None:
    # tensorflow-cpu installs the "tensorflow" package; its version is still found
    found = installed()
    assert found["torch"].startswith("2.") and found["tensorflow"] != "unknown"


def test_the_setting_narrows_what_is_offered() -> None:
    found = {"torch": "2.13.0", "tensorflow": "2.21.0"}
    assert offered("", found) == found
    assert offered(" torch ", found) == {"torch": "2.13.0"}
    assert offered("tensorflow,torch", found) == {"tensorflow": "2.21.0", "torch": "2.13.0"}


@pytest.mark.parametrize("allow", ["tensorflow", "jax", "torch,jax"])
def test_the_setting_cannot_offer_what_is_not_installed(allow: str) -> None:
    with pytest.raises(FrameworksError, match=frameworks.FRAMEWORKS_VARIABLE):
        offered(allow, {"torch": "2.13.0"})
