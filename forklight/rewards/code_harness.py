"""The code verifier's test runner: runs inside the sandbox as ``main.py`` (standard library only).

Reads ``tests.json`` (``mode``: ``stdin`` or ``call``; ``inputs``: one per test, stdin text or a list of
arguments; ``fn_name``; ``prelude``; ``test_timeout_s``; ``output_bytes``; ``stop_on_error``) and the program,
``solution.py``. Each test runs in a fresh fork of this process (so a test cannot spoil the next one's globals,
and ``os._exit`` or a crash ends only that test), in its own process group, under its own CPU limit, with stdin
from the test's input file and stdout to a file capped by ``RLIMIT_FSIZE``. ``call`` tests call ``fn_name``
(a method of ``class Solution`` when the program defines one, LeetCode-style, else a top-level function) with
the test's arguments and keep the return value as JSON (tuples become lists). The first test past its time
ends the run (with ``stop_on_error``, the first that does not finish cleanly).

One JSON line per test goes to the verifier on a descriptor the program never holds:
``{"test": k, "status": "ok" | "error" | "timeout" | "output_limit", "stdout": ..., "value": ...}``. The
expected outputs never enter the sandbox: the verifier compares them outside.
"""

import builtins
import json
import os
import resource
import select
import signal
import sys
import time
import traceback


def _wait(pid: int, timeout_s: float) -> tuple[int | None, bool]:
    """(wait status, timed out): waits for ``pid`` up to ``timeout_s`` seconds, then kills its process group."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if pidfd is not None:
            select.select([pidfd], [], [], remaining)
        else:
            time.sleep(min(remaining, 0.005))
    if pidfd is not None:
        os.close(pidfd)
    timed_out = not done
    try:
        os.killpg(pid, signal.SIGKILL)  # the test's leftovers (and the test itself past its time)
    except (ProcessLookupError, PermissionError):
        pass
    if timed_out:
        _, status = os.waitpid(pid, 0)
    return status, timed_out


def _target(namespace: dict, fn_name: str):
    solution = namespace.get("Solution")
    if isinstance(solution, type) and hasattr(solution, fn_name):
        return getattr(solution(), fn_name)
    if callable(namespace.get(fn_name)):
        return namespace[fn_name]
    raise NameError(f"the program defines neither Solution.{fn_name} nor {fn_name}")


def _run_test(spec: dict, source: str, index: int, channel: int) -> None:
    """The test's own process: never returns."""
    code = 1
    try:
        os.close(channel)
        os.setpgid(0, 0)
        cpu = int(spec["test_timeout_s"]) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["output_bytes"], spec["output_bytes"]))
        stdin_path = f"in{index}.txt" if spec["mode"] == "stdin" else os.devnull
        for fd, path, flags in ((0, stdin_path, os.O_RDONLY), (1, f"out{index}.txt", os.O_WRONLY | os.O_CREAT),
                                (2, f"err{index}.txt", os.O_WRONLY | os.O_CREAT)):
            opened = os.open(path, flags, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", errors="replace", closefd=False)
        sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", closefd=False)
        namespace = {"__name__": "__main__" if spec["mode"] == "stdin" else "solution", "__builtins__": builtins}
        exec(spec["prelude"], namespace)
        exec(compile(source, "solution.py", "exec"), namespace)
        if spec["mode"] == "call":
            value = _target(namespace, spec["fn_name"])(*spec["inputs"][index])
            with open(f"value{index}.json", "w") as handle:
                json.dump(value, handle, default=repr)
        code = 0
    except SystemExit as stop:  # a stdin program may end with exit(); a function must return
        code = 0 if stop.code in (None, 0) and spec["mode"] == "stdin" else 1
    except BaseException:  # noqa: BLE001 - the program's error ends this test
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            code = code or 1
    os._exit(code)


def _send(channel: int, data: bytes) -> None:
    while data:
        data = data[os.write(channel, data):]


def _read(path: str, limit: int) -> str | None:
    try:
        with open(path, "rb") as handle:
            text = handle.read(limit).decode("utf-8", errors="replace")
        os.unlink(path)
        return text
    except OSError:
        return None


def main() -> None:
    channel = os.dup(1)  # results go here; each test's own fd 1 is its output file
    os.set_inheritable(channel, False)
    with open("tests.json") as handle:
        spec = json.load(handle)
    with open("solution.py", encoding="utf-8", errors="replace") as handle:
        source = handle.read()
    exec(spec["prelude"], {})  # import the prelude's modules once; each test's fork finds them loaded
    for index, test_input in enumerate(spec["inputs"]):
        if spec["mode"] == "stdin":
            with open(f"in{index}.txt", "w", encoding="utf-8") as handle:
                handle.write(test_input)
        pid = os.fork()
        if pid == 0:
            _run_test(spec, source, index, channel)
        status, timed_out = _wait(pid, spec["test_timeout_s"])
        signalled = os.WIFSIGNALED(status)
        if timed_out or (signalled and os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL)):
            outcome = "timeout"
        elif signalled and os.WTERMSIG(status) == signal.SIGXFSZ:
            outcome = "output_limit"
        else:
            outcome = "ok" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "error"
        result = {"test": index, "status": outcome, "stdout": _read(f"out{index}.txt", spec["output_bytes"]),
                  "value": _read(f"value{index}.json", spec["output_bytes"]),
                  "stderr": (_read(f"err{index}.txt", 100_000) or "")[-2000:]}
        if spec["mode"] == "stdin":
            os.unlink(f"in{index}.txt")
        _send(channel, (json.dumps(result) + "\n").encode())
        if outcome == "timeout" or (outcome != "ok" and spec["stop_on_error"]):
            break  # a test past its time stops the run (the rest fail): timeouts cost seconds each


if __name__ == "__main__":
    main()
