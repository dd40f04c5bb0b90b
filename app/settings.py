"""One settings object for every gpufleet process, read from ``GPUFLEET_*`` variables.

A bad value stops the process at start with a message that names the variable, rather than
surfacing later as a confusing failure in the middle of a job.
"""

from __future__ import annotations

import re
import socket
from functools import lru_cache
from pathlib import Path
from typing import Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@localhost:5432/gpufleet"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"

_FAKE_GPU = r"\s*[A-Za-z0-9]+\s*:\s*\d+(\.\d+)?\s*"
_FAKE_GPUS_RE = re.compile(rf"^{_FAKE_GPU}(,{_FAKE_GPU})*$")


class SettingsError(RuntimeError):
    """A GPUFLEET_* variable has a value gpufleet cannot run with."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUFLEET_", extra="ignore", frozen=True)

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    api_tokens: str = ""
    fake_gpus: str = ""
    hostname: str = Field(default_factory=socket.gethostname)
    lease_ttl: float = Field(default=60.0, gt=0)
    heartbeat_interval: float = Field(default=10.0, gt=0)
    reaper_interval: float = Field(default=15.0, gt=0)
    checkpoint_root: Path = Path("./var/checkpoints")
    data_root: Path = Path("./var/data")
    entrypoint_allow: str = ""
    redispatch_after: float = Field(default=60.0, gt=0)
    telemetry_interval: float = Field(default=5.0, gt=0)
    fault_injection: bool = False
    #: checkpoints kept per job; older ones are deleted once a newer one is recorded.
    checkpoints_keep: int = Field(default=3, ge=1)
    #: grace past expiry before the reaper takes a lease back (clock skew, slow commits).
    reaper_grace: float = Field(default=0.0, ge=0)
    #: the most leases/jobs one reaper pass touches, so a pass stays short.
    reaper_batch: int = Field(default=100, ge=1)
    #: keep a trainer started ahead of the next job, its framework imported (workers).
    warm_spare: bool = True
    #: frameworks this worker offers, comma-separated (torch, tensorflow); blank: every one
    #: installed. Naming one that is not installed stops the worker at start.
    worker_frameworks: str = ""
    #: simulated GPUs (indexes in GPUFLEET_FAKE_GPUS) whose health check fails (drills, tests).
    fake_unhealthy_gpus: str = Field(default="", pattern=r"^\s*(\d+\s*(,\s*\d+\s*)*)?$")

    @field_validator("hostname")
    @classmethod
    def _hostname_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @field_validator("fake_gpus")
    @classmethod
    def _fake_gpus_well_formed(cls, value: str) -> str:
        if value.strip() and not _FAKE_GPUS_RE.match(value):
            raise ValueError("expected TYPE:GB,TYPE:GB (e.g. A100:80,T4:16)")
        return value

    @field_validator("api_tokens")
    @classmethod
    def _tokens_well_formed(cls, value: str) -> str:
        parse_api_tokens(value)
        return value

    @model_validator(mode="after")
    def _heartbeat_fits_lease(self) -> Self:
        # The watchdogs kill a trainer (and stop a worker) after lease_ttl - 2 * heartbeat
        # without a renewal. That budget must survive two missed heartbeats, or the first late
        # renewal of a healthy worker already stops it: lease_ttl >= 4 * heartbeat.
        slack = self.lease_ttl - 2 * self.heartbeat_interval
        if slack < 2 * self.heartbeat_interval:
            raise ValueError(
                f"GPUFLEET_LEASE_TTL ({self.lease_ttl:g}s) must be at least four times "
                f"GPUFLEET_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g}s): a worker stops "
                f"its trainer after lease_ttl - 2 x heartbeat ({slack:g}s) without a renewal, "
                "which must leave room for two missed heartbeats"
            )
        return self

    @property
    def tokens(self) -> dict[str, str]:
        """token -> tenant."""
        return parse_api_tokens(self.api_tokens)

    @property
    def entrypoint_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.entrypoint_allow.split(",") if p.strip())


def parse_api_tokens(raw: str) -> dict[str, str]:
    """Parse ``tenant:token,...`` into ``{token: tenant}``."""
    tokens: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        tenant, sep, token = item.partition(":")
        if not sep or not tenant.strip() or not token.strip():
            raise ValueError("expected tenant:token,tenant:token")
        tokens[token.strip()] = tenant.strip()
    return tokens


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; raises SettingsError naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "GPUFLEET_" + "_".join(str(p) for p in err["loc"]).upper()
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}" if err["loc"] else message)
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
