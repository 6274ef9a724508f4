"""A sandbox for untrusted Python programs (model-written code), built on Linux namespaces and rlimits.

    sandbox = Sandbox(SandboxLimits(wall_s=5, memory_mb=512))
    result = sandbox.run("print(input()[::-1])", stdin=b"abc\\n")        # one program
    results = sandbox.run_many([SandboxJob(code, stdin) for code in programs])  # a bounded pool

Each program runs through a launcher process (:mod:`forklight.rewards.sandbox_launcher`, run as a script by the
trainer's interpreter, ``python -I -S``) that sets the sandbox up before the program's first instruction:

1. its own session and process group (``setsid``), so the trainer kills the whole group on timeout;
2. a private mount namespace in which every mount is remounted read-only; a fresh size-capped ``tmpfs`` on
   ``/tmp`` holds the working directory ``/tmp/work`` and the program's stdin (gone with the namespace: nothing to
   clean up on the host); ``/dev`` holds only null, zero, full, random, urandom and the fd links (no GPU);
   ``/root``, ``/home``, ``/run`` and ``hidden_paths`` are hidden under empty ``tmpfs``; the interpreter's prefix
   is bound read-only at ``/tmp/.python`` (so one under ``/root`` still runs);
3. as root, a drop to an unprivileged uid (``uid``, default 65534 = nobody): ``RLIMIT_NPROC`` does not bind root;
4. a new user namespace (the uid maps to itself; no capability survives ``exec``), network namespace (only a
   loopback device that is down: no network, not even 127.0.0.1), pid namespace (the program cannot see or signal
   any process outside; when the sandbox's init exits, the kernel kills every process left inside), IPC and UTS
   namespaces, and a fresh ``/proc`` of its own;
5. rlimits: ``RLIMIT_NPROC`` (processes and threads, counted per user namespace, i.e. per sandbox, since Linux
   5.14), ``RLIMIT_AS`` (address space per process), ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``,
   ``RLIMIT_CORE`` = 0; ``PR_SET_NO_NEW_PRIVS`` (no set-uid binary gains privileges); the parent-death signal;
6. an environment with none of the trainer's variables (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``,
   ``PYTHONIOENCODING``, ``LD_LIBRARY_PATH`` only).

The trainer reads stdout and stderr up to ``output_bytes`` each (more kills the run), and kills the process group
past ``wall_s``. Setup failures come back on a status pipe that the program never holds, so a program cannot
pass itself off as a broken sandbox. Where the kernel refuses the namespaces, :meth:`Sandbox.check` raises unless
``unsafe_without_namespaces=True``: programs then run only with setsid, rlimits, the uid drop (as root), a temp
working directory (removed afterwards) and a scrubbed environment, and can reach the network and write where
that uid may write.

Why not bubblewrap/nsjail/firejail: none is pip-installable (a system package the trainer's environment cannot
pin), none sets rlimits, and as root none contains a fork bomb without the uid drop this launcher does anyway;
the calls they would make (``unshare``, ``mount``, ``setresuid``, ``setrlimit``, ``prctl``) are made here through
``ctypes``. docs/verifiers.md says what this does not protect against.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

from forklight.rewards.sandbox_launcher import NOBODY, SETUP_OK

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
HIDDEN_PATHS = ("/root", "/home", "/run")  # under empty tmpfs in the sandbox: homes (tokens, keys), /run (sockets)


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. Memory and CPU limits are per process; ``max_processes`` bounds how many."""

    wall_s: float = 10.0  # wall clock for the whole run; past it the process group is killed
    cpu_s: int = 10  # RLIMIT_CPU of each process (SIGKILL past it)
    memory_mb: int = 1024  # RLIMIT_AS of each process (address space, not resident memory)
    max_processes: int = 8  # RLIMIT_NPROC inside the sandbox: processes and threads, the interpreter included
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write
    disk_mb: int = 64  # size of the tmpfs on /tmp, the working directory included
    open_files: int = 256  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # stdout and stderr are each kept up to this; more kills the run


@dataclass
class SandboxJob:
    """One program to run: its source (``main.py``), its stdin, and extra files beside it in the working dir."""

    program: str
    stdin: bytes = b""
    files: dict[str, str | bytes] = field(default_factory=dict)
    limits: SandboxLimits | None = None  # None: the sandbox's


@dataclass
class SandboxResult:
    """What came back from one program."""

    stdout: bytes
    stderr: bytes
    returncode: int | None  # the program's exit status; 128 + n when signal n ended it; None: killed from outside
    timed_out: bool  # ran past wall_s (the group was killed)
    output_exceeded: bool  # stdout or stderr passed output_bytes (the group was killed)
    wall_s: float
    setup_error: str | None = None  # the sandbox could not be set up (not the program's doing)

    @property
    def ok(self) -> bool:
        """Exited by itself with status 0."""
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded and self.setup_error is None


class SandboxUnavailable(RuntimeError):
    """The kernel refused the sandbox (and ``unsafe_without_namespaces`` is off)."""


class Sandbox:
    """Runs untrusted Python programs, ``workers`` at a time (a bounded pool of launcher processes)."""

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        workers: int | None = None,
        python: str | None = None,
        uid: int = NOBODY,
        hidden_paths: Sequence[str] = (),
        unsafe_without_namespaces: bool = False,
    ) -> None:
        """
        Args:
            limits: per-program limits (:class:`SandboxLimits`).
            workers: programs run at once (default: the CPU count, at most 32).
            python: the interpreter that runs programs (default: this one's). Its installation prefix is bound
                read-only into the sandbox; programs run with ``-I -S`` (standard library only).
            uid: the unprivileged uid programs run as when the trainer is root (default 65534, nobody).
            hidden_paths: directories the programs must not read, besides :data:`HIDDEN_PATHS` (e.g. where the
                data set with the expected outputs lives, when any user may read it).
            unsafe_without_namespaces: run even where the kernel refuses namespaces (containers without user
                namespaces, seccomp profiles that block ``unshare``): programs then reach the network and the
                host's filesystem as ``uid``. Off by default: without namespaces :meth:`check` raises.
        """
        self.limits = limits or SandboxLimits()
        self.workers = workers or min(32, os.cpu_count() or 1)
        if self.workers < 1:
            raise ValueError(f"sandbox workers must be >= 1, got {workers}")
        executable = os.path.realpath(python or sys.executable)
        prefix = _installation_prefix(executable) if python else os.path.realpath(sys.base_prefix)
        if not executable.startswith(prefix.rstrip("/") + "/"):
            raise ValueError(f"sandbox python {executable} is not inside its installation prefix {prefix}; "
                             "give the interpreter's real path (python: /usr/bin/python3, ...)")
        self.python = executable
        self.python_prefix = prefix
        self.uid = uid
        self.hidden_paths = [*HIDDEN_PATHS, *(os.path.realpath(path) for path in hidden_paths)]
        self.unsafe_without_namespaces = unsafe_without_namespaces
        self._pool: ThreadPoolExecutor | None = None

    # ---- running ---------------------------------------------------------------------------------------------
    def run(self, program: str, stdin: bytes = b"", files: dict[str, str | bytes] | None = None,
            limits: SandboxLimits | None = None) -> SandboxResult:
        """Run one program in the calling thread."""
        return self._run(SandboxJob(program, stdin, files or {}, limits))

    def run_many(self, jobs: Sequence[SandboxJob]) -> list[SandboxResult]:
        """Run programs ``workers`` at a time; results in the order of ``jobs``."""
        if not jobs:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="forklight-sandbox")
        return list(self._pool.map(self._run, jobs))

    def check(self) -> None:
        """Run one trivial program; raise :class:`SandboxUnavailable` with what to do when the sandbox cannot start."""
        result = self.run("print(6 * 7)", limits=replace(self.limits, wall_s=max(self.limits.wall_s, 30.0)))
        if result.setup_error is not None:
            hint = ("" if self.unsafe_without_namespaces else
                    "; where the kernel cannot give namespaces (a container without user namespaces, or whose seccomp "
                    "profile blocks unshare), either allow them (docker run --security-opt seccomp=unconfined, or "
                    "sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0) or opt out with "
                    "unsafe_without_namespaces: true (programs then reach the network and the host's files)")
            raise SandboxUnavailable(f"the code sandbox cannot start: {result.setup_error}{hint}")
        if result.stdout.strip() != b"42":
            raise SandboxUnavailable(f"the code sandbox ran a trivial program wrongly (status {result.returncode}, "
                                     f"stdout {result.stdout[:200]!r}, stderr {result.stderr[-500:]!r}); if the "
                                     f"interpreter cannot start as uid {self.uid}, set python to one it can run")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self) -> dict:  # a pool does not pickle (verifiers travel to spawned workers)
        return {**self.__dict__, "_pool": None}

    def _config(self, limits: SandboxLimits, status_fd: int, files: list[str], host_dir: str) -> dict:
        return {"limits": asdict(limits), "status_fd": status_fd, "files": files, "host_dir": host_dir,
                "python": self.python, "python_prefix": self.python_prefix, "uid": self.uid,
                "hidden_paths": self.hidden_paths,
                "namespaces": not self.unsafe_without_namespaces}

    def _run(self, job: SandboxJob) -> SandboxResult:
        limits = job.limits or self.limits
        host_dir = tempfile.mkdtemp(prefix="forklight-sandbox-")  # inputs; the working dir without namespaces
        started = time.perf_counter()
        status_read, status_write = os.pipe()
        process = None
        try:
            os.mkdir(os.path.join(host_dir, "in"))
            names = ["main.py", *job.files]
            for name, content in [("main.py", job.program), *job.files.items()]:
                if "/" in name or name.startswith("."):
                    raise ValueError(f"sandbox file names are plain names, got {name!r}")
                with open(os.path.join(host_dir, "in", name), "wb") as handle:
                    handle.write(content.encode() if isinstance(content, str) else content)
            with open(os.path.join(host_dir, "stdin"), "wb") as handle:  # a file: /dev/stdin opens it too
                handle.write(job.stdin)
            with open(os.path.join(host_dir, "config.json"), "w") as handle:
                json.dump(self._config(limits, status_write, names, host_dir), handle)
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", LAUNCHER, host_dir],  # the trainer's interpreter
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_write,),
                start_new_session=True, env={}, cwd="/")
            os.close(status_write)
            status_write = -1
            return _communicate(process, status_read, limits, started, sweep_group=self.unsafe_without_namespaces)
        finally:
            if status_write >= 0:
                os.close(status_write)
            os.close(status_read)
            if process is not None and process.poll() is None:  # an exception on our side: leave nothing behind
                _kill_group(process)
            _remove_tree(host_dir)


def _installation_prefix(executable: str) -> str:
    """The directory above ``bin/`` of an interpreter (``/usr`` for ``/usr/bin/python3``)."""
    return os.path.dirname(os.path.dirname(executable))


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher's group: the sandbox's init dies with it (pdeathsig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.kill()
    except ProcessLookupError:
        pass
    process.wait()


def _remove_tree(path: str) -> None:
    def make_writable(function, name, _):  # a program may leave read-only directories (without namespaces)
        try:
            os.chmod(os.path.dirname(name), 0o700)
            os.chmod(name, 0o700)
            function(name)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable)


def _communicate(process: subprocess.Popen, status_fd: int, limits: SandboxLimits, started: float,
                 sweep_group: bool) -> SandboxResult:
    """Collect stdout/stderr (capped) and the status pipe until the launcher exits or a limit is hit."""
    deadline = started + limits.wall_s
    selector = selectors.DefaultSelector()
    buffers = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
    streams = {process.stdout.fileno(): "stdout", process.stderr.fileno(): "stderr", status_fd: "status"}
    for fd, name in streams.items():
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ, name)
    timed_out = exceeded = False
    open_reads = len(streams)
    exited_at = None
    while open_reads:
        now = time.perf_counter()
        if now >= deadline:
            timed_out = True
            break
        if exited_at is None and process.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 1.0:  # a stray holder of the pipes outlived the launcher
            break
        for key, _ in selector.select(timeout=min(deadline - now, 0.25)):
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                selector.unregister(key.fd)
                open_reads -= 1
                continue
            buffer = buffers[key.data]
            room = limits.output_bytes - len(buffer) if key.data != "status" else 4096 - len(buffer)
            buffer += chunk[:max(room, 0)]
            if len(chunk) > room:
                exceeded = key.data != "status"
                break
        if exceeded:
            break
    selector.close()
    if process.poll() is None:
        _kill_group(process)
    elif sweep_group:  # without a pid namespace, stragglers that stayed in the group (the group id stays theirs)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for stream in (process.stdout, process.stderr):
        stream.close()
    status = bytes(buffers["status"])
    setup_error = None
    if status != SETUP_OK and not timed_out and not exceeded:
        setup_error = status.decode(errors="replace").strip() or f"the launcher exited with {process.returncode} " \
            f"before starting the program: {bytes(buffers['stderr'][-2000:]).decode(errors='replace')}"
    code = process.returncode
    returncode = None if timed_out or exceeded or code is None or code < 0 else code
    return SandboxResult(bytes(buffers["stdout"]), bytes(buffers["stderr"]), returncode, timed_out, exceeded,
                         time.perf_counter() - started, setup_error)


