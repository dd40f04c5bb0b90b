"""The fork server (zygote): ``python -m workers.trainers.zygote SOCKET_FD``.

Started once per worker pool process (``workers.zygote``), it imports torch, numpy and the
trainer modules, then forks a spare trainer per request, in milliseconds instead of the
seconds a fresh interpreter spends importing torch. It must stay safe to fork:

- **No CUDA.** The zygote never calls ``torch.cuda`` (not even ``is_available``, which
  initialises the driver): a CUDA context does not survive ``fork``. Each child creates its own,
  on its device, after its environment (``CUDA_VISIBLE_DEVICES``) is set.
- **No threads.** A thread pool does not survive ``fork`` either; torch creates its intra-op
  pool lazily, so the zygote runs no parallel kernel. It checks that its imports started no
  thread (numpy's OpenBLAS pool aside, which is fork-safe) before it says it is ready, and the
  child sets its thread count from its environment.
- **TensorFlow is not forked** (it starts threads at import): TF spares are spawned as before.

One request, on a ``SOCK_SEQPACKET`` socket (one message each way, file descriptors attached):
``{"op": "fork", "env", "cwd", "framework"}`` with four descriptors (the child's stdin, its
stdout/stderr, its control pipe and a status pipe); the reply is ``{"pid": N}``. When the child
exits, the zygote writes its exit code (negative: killed by that signal, as ``Popen`` says it)
to the status pipe and closes it, but leaves it a zombie until ``{"op": "reap", "pid": N}``:
the worker signals the child's process group by its pid until then, and that pid must not be
reused by an unrelated process in the meantime.

The child: its own session and process group; SIGKILL when the zygote dies (which dies with
the worker's pool process), so nothing outlives the supervisor; exactly the environment it was
sent (``os.environ`` replaced); stdin, stdout/stderr and the control pipe on fds 0, 1/2 and 3 and
nothing else open; Python's, numpy's and torch's global random state as in a fresh interpreter.
Then it is a spare (``workers.trainers.warm.wait_and_run``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import random
import select
import signal
import socket
import sys
import traceback
from typing import Any

from workers.trainers import warm
from workers.trainers.lifeline import bind_to_supervisor
from workers.trainers.protocol import CONTROL_FD_ENV

#: the fd the child's control pipe lands on.
CHILD_CONTROL_FD = 3
#: the largest request (an environment of a few KiB, in practice).
MAX_MESSAGE = 1 << 20


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], fds or [])


def receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its descriptors; (None, []) at end of file."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, max_fds)
    if not data:
        return None, fds
    return json.loads(data), fds


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


class Zygote:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        #: live or unreaped children: pid -> the write end of its status pipe (-1: reported).
        self.children: dict[int, int] = {}
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)

    def serve(self) -> int:
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while True:
            ready, _, _ = select.select([self.sock.fileno(), self.wake_read], [], [])
            if self.wake_read in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_read, 4096)
                self.report_exits()
            if self.sock.fileno() in ready:
                message, fds = receive(self.sock, max_fds=4)
                if message is None:  # the worker is gone: so are we (and, by PDEATHSIG, ours)
                    return 0
                self.handle(message, fds)

    def handle(self, message: dict[str, Any], fds: list[int]) -> None:
        if message.get("op") == "reap":
            pid = int(message["pid"])
            if self.children.get(pid) == -1:
                del self.children[pid]
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            return
        if message.get("op") != "fork" or len(fds) != 4:
            for fd in fds:
                os.close(fd)
            send(self.sock, {"error": f"bad request {message.get('op')!r} with {len(fds)} fds"})
            return
        stdin, output, control, status = fds
        zygote_pid = os.getpid()
        started_r, started_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (*fds, started_r, started_w):
                os.close(fd)
            send(self.sock, {"error": f"fork failed: {exc}"})
            return
        if pid == 0:
            code = 1
            try:
                os.close(started_r)
                code = self.become_trainer(message, zygote_pid, started_w, fds)
            except BaseException:
                with contextlib.suppress(Exception):
                    traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    atexit._run_exitfuncs()
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(code)
        for fd in (stdin, output, control, started_w):
            os.close(fd)
        # Reply once the child leads its own process group (or died): the worker signals the
        # group by the child's pid from then on, as it may once ``Popen`` returns.
        os.read(started_r, 1)
        os.close(started_r)
        self.children[pid] = status
        send(self.sock, {"pid": pid})
        self.report_exits()  # a child that died at once

    def report_exits(self) -> None:
        for pid, status in list(self.children.items()):
            if status == -1:
                continue
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
                code = -signal.SIGKILL
            else:
                if info is None:
                    continue
                exited = info.si_code == os.CLD_EXITED
                code = info.si_status if exited else -info.si_status
            with contextlib.suppress(OSError):
                os.write(status, f"{code}\n".encode())
            os.close(status)
            self.children[pid] = -1

    def become_trainer(
        self, message: dict[str, Any], zygote_pid: int, started: int, fds: list[int]
    ) -> int:
        """In the child: become a spare trainer, as a spawned one would be."""
        stdin, output, control, _ = fds
        bind_to_supervisor(parent=zygote_pid)  # SIGKILL when the zygote dies
        os.setsid()
        os.write(started, b"s")
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The three pipes onto 0, 1/2 and 3 (via fds >= 10, so no target is overwritten first);
        # every other descriptor the zygote holds is closed, as close_fds does for a spawn.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (stdin, output, control)]
        self.sock.detach()
        os.dup2(high[0], 0)
        os.dup2(high[1], 1)
        os.dup2(high[1], 2)
        os.dup2(high[2], CHILD_CONTROL_FD)
        os.closerange(CHILD_CONTROL_FD + 1, os.sysconf("SC_OPEN_MAX"))
        env = dict(message["env"])
        env[CONTROL_FD_ENV] = str(CHILD_CONTROL_FD)
        os.environ.clear()
        os.environ.update(env)
        if message.get("cwd"):
            os.chdir(message["cwd"])
        framework = str(message.get("framework") or "torch")
        sys.argv = [warm.__file__, framework]
        fresh_process_state()
        return warm.wait_and_run(framework)


def fresh_process_state() -> None:
    """Global random state and thread counts as a freshly spawned trainer has them.

    A spawned interpreter seeds Python's, numpy's and torch's global generators from the OS; a
    forked one would share the zygote's state, so every job without a seed of its own would draw
    the same numbers. The trainers seed all three from the job's seed before drawing, so this
    only matters for code that does not. (Python's string-hash secret is fixed at interpreter
    start and cannot be drawn afresh: forked trainers share the zygote's unless the worker sets
    ``PYTHONHASHSEED``, which they then all get, as spawned ones would.)
    """
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.default_generator.seed()  # (the CPU generator: no CUDA is touched)
        threads = os.environ.get("OMP_NUM_THREADS", "").strip()
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))


def main(argv: list[str] | None = None) -> int:
    bind_to_supervisor()
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    # numpy's OpenBLAS starts its thread pool at import; it is fork-safe (its pthread_atfork
    # handlers stop the pool before a fork and the child starts its own). Nothing else may
    # start a thread: torch's pool, created lazily, would be copied broken into every child.
    import numpy  # noqa: F401

    baseline = thread_count()
    warm.import_framework("torch")
    threads = thread_count()
    send(sock, {"ready": threads == baseline, "threads": threads, "baseline": baseline})
    if threads != baseline:
        print(
            f"zygote: the imports started {threads - baseline} threads; not forking",
            file=sys.stderr,
        )
        return 1
    return Zygote(sock).serve()


if __name__ == "__main__":
    sys.exit(main())
