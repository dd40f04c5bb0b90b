"""A PgBouncer in transaction mode in front of the suite's Postgres (``GPUFLEET_TEST_PGBOUNCER=1``).

Started like the suite's own Postgres: on a free port, as a non-root user (the Postgres service
user under root: PgBouncer refuses to run as root), stopped at the end. Every database of the
server is reachable through it (``* =``), with no password (``auth_type = trust``). PgBouncer
1.18 refuses the ``options`` startup parameter that carries gpufleet's statement and lock
timeouts, so it ignores it, and the timeouts go on the role instead (:func:`role_timeouts`),
as the README's deployment notes say.

The binary: ``GPUFLEET_PGBOUNCER_BIN``, or ``pgbouncer`` on PATH, or the Debian package that
``scripts/get-pgbouncer`` unpacks into ``var/pgbouncer`` (no root needed).
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from app.embedded import EmbeddedError, _let_traverse, _postgres_user, _Server
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
UNPACKED = ROOT / "var" / "pgbouncer"


def pgbouncer_binary() -> tuple[Path, dict[str, str]]:
    """The binary and the environment it needs (its unpacked libraries)."""
    given = os.environ.get("GPUFLEET_PGBOUNCER_BIN")
    if given:
        return Path(given), {}
    found = shutil.which("pgbouncer")
    if found:
        return Path(found), {}
    unpacked = UNPACKED / "usr" / "sbin" / "pgbouncer"
    if unpacked.exists():
        libs = ":".join(str(p) for p in sorted(UNPACKED.glob("usr/lib/*-linux-gnu")))
        return unpacked, {"LD_LIBRARY_PATH": libs}
    raise EmbeddedError("no pgbouncer: run scripts/get-pgbouncer (or set GPUFLEET_PGBOUNCER_BIN)")


@dataclass
class EmbeddedPgBouncer(_Server):
    """PgBouncer in transaction mode forwarding to Postgres at ``pg_host:pg_port``."""

    pg_host: str = "127.0.0.1"
    pg_port: int = 5432
    #: server connections per database and user (a test's engine, its workers, its API).
    pool_size: int = 20

    def start(self) -> EmbeddedPgBouncer:
        binary, env = pgbouncer_binary()
        run_as = _postgres_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        users = self.data_dir / "users.txt"
        users.write_text('"postgres" ""\n')
        if run_as.uid is not None:
            for path in (self.data_dir, users):
                os.chown(path, run_as.uid, run_as.gid or -1)
            for parent in (self.data_dir, binary):  # the service user must reach them
                _let_traverse(parent)

        def argv(port: int) -> list[str]:
            config = self.data_dir / f"pgbouncer-{port}.ini"
            config.write_text(self._config(port, users))
            return [str(binary), str(config)]

        self._run(
            argv,
            self._accepts,
            "PgBouncer",
            env={**os.environ, **env},
            **run_as.popen_kwargs(),
        )
        return self

    def _config(self, port: int, users: Path) -> str:
        return f"""\
[databases]
* = host={self.pg_host} port={self.pg_port}

[pgbouncer]
listen_addr = {self.host}
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
admin_users = postgres
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 5000
max_db_connections = 0
ignore_startup_parameters = options,extra_float_digits
server_idle_timeout = 30
"""

    def pools(self) -> list[dict[str, object]]:
        """``SHOW POOLS`` of the admin console: the server connections per database."""
        return self._show("POOLS")

    def clients(self) -> list[dict[str, object]]:
        """``SHOW CLIENTS``: the connections the code under test holds to PgBouncer (what
        pg_stat_activity cannot tell behind it: a server connection serves many clients)."""
        return self._show("CLIENTS")

    def _show(self, what: str) -> list[dict[str, object]]:
        """A ``SHOW`` of the admin console (simple query protocol, as it requires)."""
        import psycopg

        dsn = f"host={self.host} port={self.port} user=postgres dbname=pgbouncer"
        with psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
            cur = conn.execute(f"SHOW {what}")
            names = [c.name for c in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def _accepts(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            return False
        return True


def role_timeouts(admin_dsn: str, settings: Settings) -> None:
    """Put gpufleet's connection timeouts (``app.db.session._connect_args``: statement, lock,
    idle in transaction = the lease TTL) on the role, as behind PgBouncer in production, where
    the startup options that carry them are dropped."""
    import psycopg

    timeouts = {
        "statement_timeout": settings.db_statement_timeout,
        "lock_timeout": settings.db_lock_timeout,
        "idle_in_transaction_session_timeout": settings.lease_ttl,
    }
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for name, seconds in timeouts.items():
            conn.execute(f"ALTER ROLE postgres SET {name} = '{seconds:g}s'")
