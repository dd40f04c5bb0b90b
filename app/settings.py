"""One settings object for every gpufleet process, read from ``GPUFLEET_*`` variables.

A bad value stops the process at start with a message that names the variable, rather than
surfacing later as a confusing failure in the middle of a job.
"""

from __future__ import annotations

import hashlib
import re
import socket
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
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
    #: tokens that see every tenant and the fleet-wide views: ``token,...`` or ``name:token,...``.
    admin_tokens: str = ""
    #: a token that may read ``/metrics`` only (admin tokens may too).
    metrics_token: str = ""
    #: the largest request body the API reads; larger ones get 413 before they are read.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
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
    #: accept and run ``command`` jobs: the submitter's own program runs on the workers.
    command_jobs: bool = False
    #: where snapshots go (``app.storage``): blank (``storage_root``), file:///dir or
    #: s3://bucket/prefix.
    storage_url: str = Field(
        default="", pattern=r"^(|file:///.*|s3://[a-z0-9][a-z0-9.-]{1,62}(/.*)?)$"
    )
    storage_root: Path = Path("./var/storage")
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr = SecretStr("")
    #: the largest code snapshot ``POST /v1/snapshots`` takes (413 above it).
    snapshot_max_bytes: int = Field(default=100_000_000, ge=1024)
    #: checkpoints kept per job; older ones are deleted once a newer one is recorded.
    checkpoints_keep: int = Field(default=3, ge=1)
    #: grace past expiry before the reaper takes a lease back (clock skew, slow commits).
    reaper_grace: float = Field(default=0.0, ge=0)
    #: the most leases/jobs one reaper pass touches, so a pass stays short.
    reaper_batch: int = Field(default=100, ge=1)
    #: days an ended job keeps its events, logs, leases and non-final checkpoints; the reaper
    #: then deletes them and keeps the job row and its summary (0: keep everything).
    retention_days: float = Field(default=30.0, ge=0)
    #: seconds any one statement may run, and may wait for a lock, on every connection (0: no
    #: limit); a stuck statement fails instead of stalling a heartbeat past its lease.
    db_statement_timeout: float = Field(default=60.0, ge=0)
    db_lock_timeout: float = Field(default=10.0, ge=0)
    #: pooled connections per process and engine (0: no pool, a connection per session), and
    #: how many more a burst may open; worker processes default to 1 and 2 (workers/main.py).
    #: The API keeps its ten open: an overflow connection is closed when it is given back, so
    #: steady load past the pool size would open a Postgres backend per request.
    db_pool_size: int = Field(default=10, ge=0)
    db_max_overflow: int = Field(default=0, ge=0)
    #: ``application_name`` of every connection, so pg_stat_activity tells the roles apart.
    db_application_name: str = "gpufleet-api"
    #: keep a trainer started ahead of the next job, its framework imported (workers).
    warm_spare: bool = True
    #: how a worker starts torch trainers: forked from a fork server that imported torch once
    #: (``workers.zygote``; Linux only), or spawned as fresh interpreters.
    trainer_start: Literal["fork", "spawn"] = "fork" if sys.platform == "linux" else "spawn"
    #: how long a worker of a scarce GPU type lets a job that a more plentiful, idle type also
    #: fits wait for that type before it takes the job itself (0: never defer).
    scarce_defer_s: float = Field(default=1.5, ge=0, le=60)
    #: how long a worker on a poor host for a job (a single-GPU job on a host that could hold a
    #: gang, a gang on a host with more free devices than it needs) lets a better host take it
    #: before it takes the job itself (0: never defer; ``app.domain.fragmentation``).
    placement_defer_s: float = Field(default=1.5, ge=0, le=60)
    #: how long a worker woken for a gang that does not fit yet keeps its host's devices idle
    #: for it as they free (reserved: single-GPU jobs stay off them), at most (0: never hold).
    gang_hold_s: float = Field(default=120.0, ge=0, le=3600)
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

    @field_validator("admin_tokens")
    @classmethod
    def _admin_tokens_well_formed(cls, value: str) -> str:
        parse_admin_tokens(value)
        return value

    @model_validator(mode="after")
    def _tokens_distinct(self) -> Self:
        tenant_tokens = set(token_digests(self.api_tokens))
        admin = set(admin_digests(self.admin_tokens).values())
        if tenant_tokens & admin:
            raise ValueError(
                "a token is listed both in GPUFLEET_API_TOKENS and in GPUFLEET_ADMIN_TOKENS"
            )
        return self

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
    def auth_required(self) -> bool:
        """With no tenant tokens configured, the API serves one tenant on loopback only."""
        return bool(self.api_tokens.strip())

    @property
    def entrypoint_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.entrypoint_allow.split(",") if p.strip())


def hash_token(token: str) -> str:
    """Tokens are kept and compared as SHA-256 digests: a token is a random secret, so a fast
    hash is enough, and a memory dump or a log of the settings object shows no token."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_api_tokens(raw: str) -> dict[str, str]:
    """Parse ``tenant:token,...`` into ``{token: tenant}``. A token listed for two tenants is
    an error that names the tenants (never the token)."""
    tokens: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        tenant, sep, token = item.partition(":")
        if not sep or not tenant.strip() or not token.strip():
            raise ValueError("expected tenant:token,tenant:token")
        token, tenant = token.strip(), tenant.strip()
        earlier = tokens.get(token)
        if earlier is not None and earlier != tenant:
            raise ValueError(
                f"one token is listed for two tenants ({earlier!r} and {tenant!r}); "
                "each tenant needs its own token"
            )
        tokens[token] = tenant
    return tokens


def token_digests(raw: str) -> dict[str, str]:
    """``GPUFLEET_API_TOKENS`` as ``{sha256(token): tenant}``."""
    return {hash_token(token): tenant for token, tenant in parse_api_tokens(raw).items()}


def parse_admin_tokens(raw: str) -> dict[str, str]:
    """Parse ``token,...`` or ``name:token,...`` into ``{name: token}`` (unnamed: admin-N)."""
    admins: dict[str, str] = {}
    for n, item in enumerate((part.strip() for part in raw.split(",") if part.strip()), 1):
        name, sep, token = item.rpartition(":")
        if not sep:
            name = f"admin-{n}"
        if not token.strip() or not name.strip():
            raise ValueError("expected token,token or name:token,name:token")
        admins[name.strip()] = token.strip()
    return admins


def admin_digests(raw: str) -> dict[str, str]:
    """``GPUFLEET_ADMIN_TOKENS`` as ``{name: sha256(token)}``."""
    return {name: hash_token(token) for name, token in parse_admin_tokens(raw).items()}


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
