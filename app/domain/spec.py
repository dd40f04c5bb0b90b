"""The job spec a user submits, and its validation (pure: no I/O).

Unknown fields are refused everywhere (``extra="forbid"``): a typo in a key should be an error
the user sees at submit, not a default silently used for a week of training.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from app.domain.gangs import MAX_GPU_COUNT
from app.domain.routing import ANY_TYPE, MAX_GPU_TYPES, TIERS, job_queue, normalize_types

MAX_PRIORITY = 9  #: the most urgent priority
DEFAULT_PRIORITY = 5
#: the version of these rules a stored spec was validated against (``jobs.spec_version``). A
#: stored spec is never validated again: tightening a rule later must not break old jobs.
SPEC_VERSION = 1
#: the longest ``max_runtime`` / ``max_wait``: 30 days.
MAX_SECONDS = 30 * 24 * 3600

ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
_ENTRYPOINT_RE = re.compile(ENTRYPOINT_PATTERN)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: the control-character rule, as the OpenAPI document states it.
_NO_CONTROL_PATTERN = "^[^\\x00-\\x1f\\x7f]*$"


def _no_control_characters(value: str) -> str:
    """Postgres refuses NUL in text, and control characters garble every terminal that lists
    jobs: refused at submit, with the position, rather than a 500 or a broken table later."""
    found = _CONTROL_RE.search(value)
    if found:
        raise ValueError(
            f"control character {found.group()!r} at position {found.start()} is not allowed"
        )
    return value


#: every free-text field of a spec (each also has a length limit where it is used).
Text = Annotated[
    str,
    AfterValidator(_no_control_characters),
    Field(json_schema_extra={"pattern": _NO_CONTROL_PATTERN}),
]
#: seeds every framework accepts (numpy's are 32-bit).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "description": "classification needs output_dim >= 2.",
            "anyOf": [
                {"properties": {"task": {"const": "regression"}}},
                {
                    "required": ["task", "output_dim"],
                    "properties": {
                        "task": {"const": "classification"},
                        "output_dim": {"minimum": 2},
                    },
                },
            ],
        }
    )

    type: Literal["mlp"] = "mlp"
    input_dim: int = Field(default=32, ge=1, le=65536)
    hidden_units: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [128, 64], max_length=32
    )
    output_dim: int = Field(default=1, ge=1, le=65536)
    task: Literal["regression", "classification"] = "regression"

    @model_validator(mode="after")
    def _classification_needs_classes(self) -> Self:
        if self.task == "classification" and self.output_dim < 2:
            raise ValueError("classification needs output_dim >= 2 (one output per class)")
        return self


#: a data file as the OpenAPI document states it: relative, no '..', .npz or .csv.
_DATA_PATH_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]*(/[A-Za-z0-9_][A-Za-z0-9_-]*)*\.(npz|csv)$"


class DataSpec(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "description": "source 'file' needs path (relative to the data root, .npz or .csv,"
            " no '..'); path is only for source 'file'.",
            "anyOf": [
                {
                    "required": ["source", "path"],
                    "properties": {
                        "source": {"const": "file"},
                        "path": {"type": "string", "pattern": _DATA_PATH_PATTERN},
                    },
                },
                {"properties": {"source": {"const": "synthetic"}, "path": {"type": "null"}}},
            ],
        }
    )

    source: Literal["synthetic", "file"] = "synthetic"
    samples: int = Field(default=20000, ge=1, le=50_000_000)
    seed: Seed = 0
    #: for ``source: file``: a ``.npz`` (arrays ``x`` and ``y``) or ``.csv`` (last column is the
    #: target) path relative to ``GPUFLEET_DATA_ROOT``.
    path: Annotated[Text, Field(max_length=1024)] | None = None

    @model_validator(mode="after")
    def _file_needs_path(self) -> Self:
        if self.source == "file":
            if not self.path:
                raise ValueError("data.source 'file' needs data.path (relative to the data root)")
            if not self.path.endswith((".npz", ".csv")):
                raise ValueError("data.path must be a .npz or .csv file")
            if self.path.startswith("/") or ".." in self.path.split("/"):
                raise ValueError("data.path must be relative to GPUFLEET_DATA_ROOT, without '..'")
        elif self.path is not None:
            raise ValueError("data.path is only for data.source 'file'")
        return self


class TrainingSpec(_Strict):
    epochs: int = Field(default=3, ge=1, le=10_000)
    batch_size: int = Field(default=256, ge=1, le=1_048_576)
    learning_rate: float = Field(default=0.001, gt=0, le=10)
    seed: Seed = 0
    checkpoint_every_steps: int = Field(default=50, ge=1)
    mixed_precision: bool = False
    #: cap the run at this many optimizer steps (smoke tests, benchmarks); None = all epochs.
    max_steps: int | None = Field(default=None, ge=1)


#: one GPU type name as the OpenAPI document states it.
_GpuTypeName = Annotated[
    Text, Field(max_length=64, json_schema_extra={"pattern": "^[A-Za-z0-9]{1,32}$"})
]
#: at least one name: the validator refuses an empty list with its own message.
_GpuTypeList = Annotated[
    list[_GpuTypeName], Field(max_length=MAX_GPU_TYPES, json_schema_extra={"minItems": 1})
]


class ResourcesSpec(_Strict):
    gpu_type: _GpuTypeName | _GpuTypeList = Field(
        default=ANY_TYPE,
        description="A GPU type name (A100, T4, ...; case-insensitive), 'any', or a list "
        "of alternatives (['V100', 'T4']: the job runs once, on whichever frees first).",
    )
    memory_gb: float = Field(
        default=8,
        gt=0,
        description=f"GPU memory the job needs; at most the largest tier, {TIERS[-1]} GB.",
        json_schema_extra={"maximum": TIERS[-1]},
    )
    gpu_count: int = Field(
        default=1,
        ge=1,
        le=MAX_GPU_COUNT,
        description="GPUs of one host (a gang: one trainer rank per GPU, torch "
        "DistributedDataParallel); more than any one host has fitting is refused at submit "
        "(multi-host jobs are not supported). memory_gb is per GPU.",
    )
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)

    @field_validator("gpu_type")
    @classmethod
    def _known_shape(cls, value: str | list[str]) -> str | list[str]:
        return normalize_types(value)


class FaultSpec(_Strict):
    """Injected faults for drills and tests; refused unless GPUFLEET_FAULT_INJECTION=1."""

    model_config = ConfigDict(
        json_schema_extra={
            "description": "fail_at_step and fail_with go together.",
            "anyOf": [
                {
                    "required": ["fail_at_step", "fail_with"],
                    "properties": {
                        "fail_at_step": {"type": "integer"},
                        "fail_with": {"type": "string"},
                    },
                },
                {"properties": {"fail_at_step": {"type": "null"}, "fail_with": {"type": "null"}}},
            ],
        }
    )

    oom_above_micro_batch: int | None = Field(default=None, ge=0)
    fail_at_step: int | None = Field(default=None, ge=1)
    #: transient: an OSError (infra); value_error: user error; gpu_fault: a CUDA hardware
    #: error (infra, and the device is marked suspect).
    fail_with: Literal["transient", "value_error", "gpu_fault"] | None = None
    #: sleep this long after each step (lets tests kill a job mid-run on a fast CPU).
    step_delay_s: float = Field(default=0.0, ge=0, le=10)

    @model_validator(mode="after")
    def _fail_pair(self) -> Self:
        if (self.fail_at_step is None) != (self.fail_with is None):
            raise ValueError("faults.fail_at_step and faults.fail_with go together")
        return self


#: ``env`` names a job may not set: the worker's own variables, the GPU it was given, the
#: dynamic loader, and which interpreter and code run.
RESERVED_ENV_PREFIXES = ("GPUFLEET_", "CUDA_", "NVIDIA_", "LD_")
RESERVED_ENV_NAMES = frozenset({"PATH", "PYTHONPATH", "PYTHONHOME"})
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: the most ``command`` arguments and ``env`` variables a job may give.
MAX_COMMAND_ARGS = 256
MAX_ENV_VARS = 64


def _split_command(value: Any) -> Any:
    """A command given as one string is split like a POSIX shell would (never run by one)."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"command: cannot split {value!r}: {exc}") from None
    return value


def _env_name(name: str) -> str:
    if not _ENV_NAME_RE.match(name):
        raise ValueError(f"env: {name!r} is not a variable name (letters, digits, '_')")
    if name.upper() in RESERVED_ENV_NAMES or name.upper().startswith(RESERVED_ENV_PREFIXES):
        reserved = ", ".join([*(p + "*" for p in RESERVED_ENV_PREFIXES), *RESERVED_ENV_NAMES])
        raise ValueError(f"env: {name!r} is reserved for the worker ({reserved})")
    return name


Command = Annotated[
    list[Annotated[Text, Field(min_length=1, max_length=4096)]],
    Field(min_length=1, max_length=MAX_COMMAND_ARGS),
]
EnvName = Annotated[str, Field(max_length=128), AfterValidator(_env_name)]
EnvValue = Annotated[Text, Field(max_length=8192)]


class JobSpec(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "description": "A training job. Give 'framework', an 'entrypoint' (custom "
            "trainer; its module must be under GPUFLEET_ENTRYPOINT_ALLOW) or a 'command' (only "
            "where GPUFLEET_COMMAND_JOBS=1). 'faults' only where GPUFLEET_FAULT_INJECTION=1. "
            "gpu_count > 1 not with a custom TensorFlow trainer (framework tensorflow with an "
            "entrypoint).",
            "anyOf": [
                {"required": ["framework"], "properties": {"framework": {"type": "string"}}},
                {"required": ["entrypoint"], "properties": {"entrypoint": {"type": "string"}}},
                {"required": ["command"]},
            ],
            # several GPUs: not a custom TensorFlow trainer (``_gang_shape``)
            "allOf": [
                {
                    "anyOf": [
                        {
                            "properties": {
                                "resources": {"properties": {"gpu_count": {"maximum": 1}}}
                            }
                        },
                        {"properties": {"framework": {"not": {"const": "tensorflow"}}}},
                        {"not": {"required": ["entrypoint"]}},
                        {"properties": {"entrypoint": {"type": "null"}}},
                    ]
                }
            ],
        }
    )

    name: Text = Field(default="job", min_length=1, max_length=200)
    framework: Literal["torch", "tensorflow"] | None = None
    entrypoint: (
        Annotated[
            Text,
            Field(
                max_length=300,
                description="'package.module:function', a custom trainer.",
                json_schema_extra={"pattern": ENTRYPOINT_PATTERN},
            ),
        ]
        | None
    ) = None
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY)
    max_attempts: int = Field(default=3, ge=1, le=100)
    distributed_training: bool = Field(
        default=False,
        description="Train on the job's gpu_count GPUs with torch DistributedDataParallel; "
        "implied (and set) by gpu_count > 1.",
    )
    #: seconds one attempt may run; then it stops at a checkpoint and fails ``timeout``.
    max_runtime: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SECONDS,
        description="Seconds one attempt may run; then it stops at a checkpoint and fails "
        "'timeout'.",
    )
    #: seconds the job may wait queued; then, or once no registered device could ever run it,
    #: it fails ``unschedulable``.
    max_wait: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SECONDS,
        description="Seconds the job may wait queued; then, or when no registered device "
        "could ever run it, it fails 'unschedulable'.",
    )
    faults: FaultSpec | None = None
    command: Command | None = Field(
        default=None,
        description="Your own program: an argv list, or a string split like a shell would "
        "(never run by one). Only where GPUFLEET_COMMAND_JOBS=1.",
    )
    snapshot: str | None = Field(
        default=None,
        description="A code snapshot of yours (POST /v1/snapshots): unpacked as the command's "
        "working directory, or put on PYTHONPATH for an entrypoint (which may then name any "
        "module of it).",
        pattern=r"^[0-9a-f]{64}$",
    )
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict,
        max_length=MAX_ENV_VARS,
        description="Plain, non-secret variables for a command job; names under GPUFLEET_, "
        "CUDA_, NVIDIA_, LD_ and PATH, PYTHONPATH, PYTHONHOME are refused.",
    )

    @field_validator("command", mode="before")
    @classmethod
    def _command_argv(cls, value: Any) -> Any:
        return _split_command(value)

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint_shape(cls, value: str | None) -> str | None:
        if value is not None and not _ENTRYPOINT_RE.match(value):
            raise ValueError("entrypoint must look like 'package.module:function'")
        return value

    @model_validator(mode="after")
    def _gang_shape(self) -> Self:
        """A job of several GPUs runs its trainer (or its command) once per GPU
        (``workers.gang``)."""
        if self.resources.gpu_count == 1:
            return self
        n = self.resources.gpu_count
        if self.entrypoint is not None and self.effective_framework == "tensorflow":
            raise ValueError(
                f"gpu_count {n}: a custom TensorFlow trainer of several GPUs is not supported "
                "(the built-in TensorFlow trainer runs them with MirroredStrategy; a custom "
                "trainer of several GPUs runs as torch.distributed ranks: framework torch)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _gang_implies_distributed(cls, data: Any) -> Any:
        """``gpu_count`` > 1 implies ``distributed_training`` (stored so, whatever was sent)."""
        if isinstance(data, dict):
            resources = data.get("resources")
            count = resources.get("gpu_count") if isinstance(resources, dict) else None
            if isinstance(count, int) and not isinstance(count, bool) and count > 1:
                return {**data, "distributed_training": True}
        return data

    @model_validator(mode="after")
    def _one_way_to_train(self) -> Self:
        if self.command is not None:
            if self.entrypoint is not None:
                raise ValueError("give 'command' or 'entrypoint', not both")
            return self
        if self.entrypoint is None and self.framework is None:
            raise ValueError(
                "give 'framework' (torch or tensorflow), an 'entrypoint' or a 'command'"
            )
        if self.env:
            raise ValueError("'env' is for command jobs only")
        if self.snapshot is not None and self.entrypoint is None:
            raise ValueError("'snapshot' is for command and entrypoint jobs only")
        return self

    @property
    def queue(self) -> str:
        return job_queue(
            self.resources.gpu_type, self.resources.memory_gb, self.effective_framework
        )

    @property
    def effective_framework(self) -> str:
        """Custom entrypoints run in the torch trainer process unless the spec says otherwise."""
        return self.framework or "torch"


class SpecPolicyError(ValueError):
    """The spec is well formed but this deployment does not allow it."""


def check_policy(
    spec: JobSpec,
    *,
    entrypoint_prefixes: tuple[str, ...],
    fault_injection: bool,
    command_jobs: bool = False,
) -> None:
    """Deployment rules a spec must pass at submit: allowed entrypoints, fault injection,
    command jobs."""
    if (spec.command is not None or spec.snapshot is not None) and not command_jobs:
        raise SpecPolicyError(
            "command jobs are off in this deployment: its operator turns them on with "
            "GPUFLEET_COMMAND_JOBS=1 (they run the submitter's program on the workers)"
        )
    # An entrypoint in the job's own snapshot is the submitter's code, like a command: allowed
    # where command jobs are, whatever its module's name.
    if spec.entrypoint is not None and spec.snapshot is None:
        module = spec.entrypoint.partition(":")[0]
        allowed = any(
            module == prefix or module.startswith(prefix.rstrip(".") + ".")
            for prefix in entrypoint_prefixes
        )
        if not allowed:
            where = ", ".join(entrypoint_prefixes) or "none are allowed"
            raise SpecPolicyError(
                f"entrypoint module {module!r} is not under an allowed prefix "
                f"(GPUFLEET_ENTRYPOINT_ALLOW: {where})"
            )
    if spec.faults is not None and not fault_injection:
        raise SpecPolicyError(
            "'faults' is only accepted when GPUFLEET_FAULT_INJECTION=1 (drills and tests)"
        )
