"""The sandbox launcher: sets one sandbox up, then execs the program in it (see :mod:`forklight.rewards.sandbox`).

The trainer runs this file as a script, ``python -I -S -B sandbox_launcher.py HOST_DIR``, in a new session; it
reads ``HOST_DIR/config.json`` and the program's files under ``HOST_DIR/in``. It is single-threaded and imports
only a few standard-library modules (it starts once per program: its start-up is the sandbox's overhead).

As root: a private mount namespace where every mount is remounted read-only, a size-capped tmpfs on /tmp with
the working dir, /root and /home hidden, the interpreter bound read-only at /tmp/.python; then the drop to the
unprivileged uid, then new user (uid mapped to itself), mount, network, pid, IPC and UTS namespaces. As another
user: the user namespace first (it grants the right to mount), the same mounts, then the other namespaces. Then
it forks the sandbox's init (pid 1: when it exits the kernel kills everything left in the namespace), which
mounts a fresh /proc, sets RLIMIT_NPROC and forks the program's process: rlimits, no_new_privs, exec.

Failures before the exec are written to the status pipe (``status_fd``, close-on-exec: the program never holds
it) and the launcher exits 125; the pipe holds exactly ``exec\n`` when the program was started.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys

NOBODY = 65534
WORK_DIR = "/tmp/work"  # the program's working directory inside the sandbox
PYTHON_DIR = "/tmp/.python"  # the interpreter's prefix, bound read-only
STDIN_FILE = "/tmp/.stdin"  # the program's stdin
SETUP_OK = b"exec\n"  # written on the status pipe just before exec'ing the program


CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 8192, 16384, 1 << 18, 1 << 21
MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}  # kept on remount (the kernel may lock them)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
DEVICES = ("null", "zero", "full", "random", "urandom")  # all the sandbox's /dev holds, besides the fd links


class SetupError(Exception):
    pass


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _call(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)} (errno {errno})")


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, data: str | None, what: str) -> None:
    encode = (lambda s: None if s is None else s.encode())
    _call(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), what)


def _unescape(field: str) -> str:
    """A mountinfo path with its octal escapes (``\\040`` for a space) decoded."""
    parts = field.split("\\")
    return parts[0] + "".join(chr(int(part[:3], 8)) + part[3:] for part in parts[1:])


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) of every mount in this mount namespace, parents first."""
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            point = _unescape(fields[4])
            flags = 0
            for option in fields[5].split(","):
                flags |= MOUNT_FLAGS.get(option, 0)
            points.append((point, flags))
    return points


def _minimal_dev(libc) -> None:
    """A /dev with only null, zero, full, random, urandom and the fd links: no GPU, disk or terminal device."""
    staging = "/tmp/.dev"
    os.mkdir(staging, 0o755)
    _mount(libc, "tmpfs", staging, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755", "mount a tmpfs for /dev")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            open(f"{staging}/{name}", "w").close()
            _mount(libc, f"/dev/{name}", f"{staging}/{name}", None, MS_BIND, None, f"bind /dev/{name}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{staging}/{name}")
    os.mkdir(f"{staging}/shm", 0o755)
    _mount(libc, staging, "/dev", None, MS_MOVE, None, "move the minimal /dev into place")
    os.rmdir(staging)


def _set_up_filesystem(libc, config: dict, files: dict[str, bytes], stdin: bytes) -> None:
    """In a fresh mount namespace: everything read-only, a tmpfs /tmp with the working dir, a minimal /dev,
    the interpreter bound read-only, the hidden paths under empty tmpfs."""
    limits = config["limits"]
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, None, "make mounts private")  # nothing leaks to the host
    for point, flags in _mount_points():
        if point == "/proc" or point.startswith("/proc/"):
            continue  # the user namespace's maps are written there; the sandbox gets a /proc of its own
        if libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None) != 0 and point == "/":
            _call(-1, "remount / read-only")  # other mounts that refuse (hidden, gone) keep the uid's permissions
    _mount(libc, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(limits['disk_mb'])}m,mode=1777", "mount a tmpfs on /tmp")
    os.mkdir(PYTHON_DIR, 0o755)
    _mount(libc, config["python_prefix"], PYTHON_DIR, None, MS_BIND | MS_REC, None, "bind the interpreter")
    _mount(libc, None, PYTHON_DIR, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None,
           "make the interpreter read-only")
    _minimal_dev(libc)
    for hidden in config["hidden_paths"]:  # homes (tokens, keys, caches), /run (sockets), the user's own
        if os.path.isdir(hidden) and not os.path.islink(hidden):
            _mount(libc, "tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k,mode=0755", f"hide {hidden}")
    owner = config["uid"] if os.geteuid() == 0 else os.geteuid()
    _write_files(WORK_DIR, files, owner)
    _write_file(STDIN_FILE, stdin, owner)


def _write_file(path: str, content: bytes, owner: int) -> None:
    with open(path, "wb") as handle:
        handle.write(content)
    if os.geteuid() == 0:
        os.chown(path, owner, owner)


def _write_files(directory: str, files: dict[str, bytes], owner: int) -> None:
    """The program's working directory, owned by the uid it runs as, with its files."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(directory, owner, owner)
    for name, content in files.items():
        _write_file(os.path.join(directory, name), content, owner)


def _drop_to(libc, uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _call(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "keep /proc/self writable")  # a uid change cleared it


def _enter_user_namespace(libc, flags: int) -> None:
    uid, gid = os.geteuid(), os.getegid()
    _call(libc.unshare(CLONE_NEWUSER | flags), "unshare user namespace")
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        with open(path, "w") as handle:
            handle.write(text)


def _program_rlimits(limits: dict) -> None:
    megabyte = 1 << 20
    for name, value in (("RLIMIT_AS", limits["memory_mb"] * megabyte), ("RLIMIT_CPU", limits["cpu_s"]),
                        ("RLIMIT_FSIZE", limits["file_size_mb"] * megabyte), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (int(value), int(value)))


def _exec_program(libc, config: dict, status_fd: int, work_dir: str, python: str, env: dict, stdin: str) -> None:
    """The program's own process: stdin from its file, last limits, then exec. Never returns."""
    try:
        opened = os.open(stdin, os.O_RDONLY)
        os.dup2(opened, 0)
        os.close(opened)
        _program_rlimits(config["limits"])
        _call(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")
        os.chdir(work_dir)
        os.write(status_fd, SETUP_OK)  # the status pipe is close-on-exec: the program never holds it
        os.execve(python, [python, "-I", "-S", "-B", "main.py"], env)
    except BaseException as error:  # noqa: BLE001 - report any failure on the status pipe
        os.write(status_fd, f"starting the program failed: {error}".encode())
        os._exit(125)


def _wait_status(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _launch(host_dir: str) -> None:
    with open(os.path.join(host_dir, "config.json")) as handle:
        config = json.load(handle)
    status_fd = int(config["status_fd"])
    os.set_inheritable(status_fd, False)
    limits = config["limits"]
    files = {}
    for name in config["files"]:
        with open(os.path.join(host_dir, "in", name), "rb") as handle:
            files[name] = handle.read()
    with open(os.path.join(host_dir, "stdin"), "rb") as handle:
        stdin = handle.read()
    root = os.geteuid() == 0
    python_rel = os.path.relpath(config["python"], config["python_prefix"])
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    try:
        libc = _libc()
        if not config["namespaces"]:
            work_dir = os.path.join(host_dir, "work")
            _write_files(work_dir, files, config["uid"])
            if root:
                os.chmod(host_dir, 0o711)  # the uid may pass through to its working dir, not list the inputs
                _drop_to(libc, config["uid"])
            _call(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "set the parent-death signal")
            resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
            env.update(HOME=work_dir, TMPDIR=work_dir, LD_LIBRARY_PATH=os.path.join(config["python_prefix"], "lib"))
            _exec_program(libc, config, status_fd, work_dir, config["python"], env, os.path.join(host_dir, "stdin"))
        if root:  # mounts as root (it can read the interpreter wherever it is), then the uid drop
            _call(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
            _set_up_filesystem(libc, config, files, stdin)
            _drop_to(libc, config["uid"])
            _enter_user_namespace(libc, CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)
        else:  # an unprivileged user: the user namespace first gives the right to mount
            _enter_user_namespace(libc, CLONE_NEWNS)
            _set_up_filesystem(libc, config, files, stdin)
            _call(libc.unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare namespaces")
        _call(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "set the parent-death signal")
        if os.getppid() == 1:
            os._exit(137)  # the trainer died meanwhile
    except (SetupError, OSError) as error:
        os.write(status_fd, f"{error}".encode())
        os._exit(125)
    alive_read, alive_write = os.pipe()  # the sandbox's init watches the launcher through it
    init = os.fork()
    if init == 0:  # pid 1 of the new pid namespace: when it exits, the kernel kills everything left inside
        try:
            os.close(alive_write)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if select.select([alive_read], [], [], 0)[0]:  # EOF already: the launcher died before pdeathsig was set
                os._exit(137)
            if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, None) != 0:
                # a kernel that refuses a new proc here (a container masking parts of its /proc): hide the host's
                _mount(libc, "tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k", "hide /proc")
            nproc = limits["max_processes"] + 2  # + the launcher and this init: the same user namespace
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            env.update(HOME=WORK_DIR, TMPDIR="/tmp", LD_LIBRARY_PATH=os.path.join(PYTHON_DIR, "lib"))
            program = os.fork()
            if program == 0:
                os.close(alive_read)
                _exec_program(libc, config, status_fd, WORK_DIR, os.path.join(PYTHON_DIR, python_rel), env, STDIN_FILE)
            os.close(status_fd)
            os._exit(_wait_status(program))
        except BaseException as error:  # noqa: BLE001
            try:
                os.write(status_fd, f"sandbox init failed: {error}".encode())
            finally:
                os._exit(125)
    os.close(alive_read)
    os.close(status_fd)
    os._exit(_wait_status(init))


if __name__ == "__main__":
    _launch(sys.argv[1])
