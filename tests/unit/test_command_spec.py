"""Command jobs in the spec: argv or a shlex string, a plain env, and the deployment's switch."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.domain.spec import JobSpec, SpecPolicyError, check_policy


def test_a_command_string_is_split_like_a_shell_never_run_by_one() -> None:
    spec = JobSpec.model_validate({"command": "python train.py --name 'my run' ; rm -rf /"})
    assert spec.command == ["python", "train.py", "--name", "my run", ";", "rm", "-rf", "/"]
    assert JobSpec.model_validate({"command": ["python", "a b.py"]}).command == ["python", "a b.py"]
    assert spec.effective_framework == "torch"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"command": ""}, "at least 1 item"),
        ({"command": "python 'unclosed"}, "cannot split"),
        ({"command": ["python", ""]}, "command.1"),
        ({"command": ["python"], "entrypoint": "a.b:c"}, "not both"),
        ({"command": ["python"], "env": {"CUDA_VISIBLE_DEVICES": "1"}}, "reserved"),
        ({"command": ["python"], "env": {"gpufleet_token": "x"}}, "reserved"),
        ({"command": ["python"], "env": {"LD_PRELOAD": "/x.so"}}, "reserved"),
        ({"command": ["python"], "env": {"PYTHONPATH": "/x"}}, "reserved"),
        ({"command": ["python"], "env": {"A-B": "1"}}, "not a variable name"),
        ({"command": ["python"], "env": {"A": "x\x00"}}, "control character"),
        ({"framework": "torch", "env": {"A": "1"}}, "for command jobs only"),
        ({"framework": "torch", "snapshot": "a" * 64}, "for command and entrypoint jobs only"),
    ],
)
def test_bad_commands_and_env_are_refused_naming_the_problem(
    body: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(body)
    assert needle in str(info.value)


def test_command_jobs_are_refused_unless_the_deployment_allows_them() -> None:
    spec = JobSpec.model_validate({"command": "python train.py", "env": {"LR": "3e-4"}})
    with pytest.raises(SpecPolicyError, match="GPUFLEET_COMMAND_JOBS=1"):
        check_policy(spec, entrypoint_prefixes=(), fault_injection=False)
    check_policy(spec, entrypoint_prefixes=(), fault_injection=False, command_jobs=True)
