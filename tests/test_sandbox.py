"""The code sandbox holds: an adversarial program is contained, the trainer (this process) is unharmed, and the
next program runs normally. Limits are small so that the fork and memory bombs stay cheap on a 2-core machine."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from forklight.rewards.sandbox import Sandbox, SandboxJob, SandboxLimits, SandboxUnavailable

SMALL = SandboxLimits(wall_s=3.0, cpu_s=3, memory_mb=256, max_processes=6, output_bytes=1 << 16)
SECRET = "forklight-test-secret-4242"


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox(SMALL, workers=2)
    box.check()  # no skip: a machine where the sandbox cannot start fails here, saying what to do
    yield box
    box.close()


def assert_next_program_runs(sandbox: Sandbox) -> None:
    result = sandbox.run("print(sum(map(int, input().split())))", stdin=b"2 40\n")
    assert result.ok and result.stdout == b"42\n", result


def test_a_program_runs_with_stdin_files_and_a_scrubbed_environment(sandbox, monkeypatch):
    monkeypatch.setenv("FORKLIGHT_SECRET", SECRET)
    result = sandbox.run("import os, sys\nprint(open('data.txt').read(), input())\nprint(sorted(os.environ))\n"
                         "print(os.getcwd(), os.getpid())", stdin=b"world\n", files={"data.txt": "hello"})
    assert result.ok, result
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "hello world"
    assert "FORKLIGHT_SECRET" not in lines[1] and set(eval(lines[1])) <= {  # noqa: S307 - our own program's list
        "PATH", "HOME", "LANG", "PYTHONIOENCODING", "TMPDIR", "LD_LIBRARY_PATH"}
    assert lines[2] == "/tmp/work 2"  # its own pid namespace: init is 1, the program 2


def test_dev_holds_only_harmless_devices_and_the_stdin_links(sandbox):
    result = sandbox.run("import os\nprint(sorted(os.listdir('/dev')))\nprint(open('/dev/stdin').read().strip())\n"
                         "print(len(open('/dev/urandom', 'rb').read(8)), open('/dev/null', 'w').write('x'))",
                         stdin=b"read through /dev/stdin\n")
    assert result.ok, result
    devices, line, sizes = result.stdout.decode().splitlines()
    assert eval(devices) == ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]  # noqa: S307
    assert line == "read through /dev/stdin" and sizes == "8 1"  # no GPU, disk or terminal device


def test_exit_status_and_stderr_come_back(sandbox):
    result = sandbox.run("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)")
    assert (result.returncode, result.stdout, result.stderr, result.timed_out) == (3, b"out\n", b"err\n", False)
    assert not result.ok and result.setup_error is None


RUNAWAY = {
    "infinite loop": "while True: pass",
    "sleep": "import time\ntime.sleep(600)",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "fork bomb that hides in new sessions": ("import os, time\nwhile True:\n    try:\n        if os.fork() == 0:\n"
                                             "            os.setsid()\n    except OSError:\n        time.sleep(0.01)"),
}


@pytest.mark.parametrize("name", sorted(RUNAWAY))
def test_runaway_programs_are_killed_with_their_whole_group(sandbox, name):
    result = sandbox.run(RUNAWAY[name])
    assert result.timed_out and result.returncode is None and not result.ok, (name, result)
    assert_next_program_runs(sandbox)


def test_a_fork_bomb_gets_only_max_processes(sandbox):
    result = sandbox.run("import os, time\nchildren = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
                         "            time.sleep(30)\n            os._exit(0)\n        children += 1\n"
                         "except OSError as error:\n    print(children, error.errno)")
    assert result.ok, result
    children, errno = map(int, result.stdout.split())
    assert children == SMALL.max_processes - 1 and errno == 11  # EAGAIN: the program itself is one of them
    assert_next_program_runs(sandbox)  # the sleeping children died with the sandbox


def test_a_memory_bomb_hits_its_address_space_limit(sandbox):
    result = sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytearray(32 << 20))")
    assert result.returncode == 1 and b"MemoryError" in result.stderr, result
    assert_next_program_runs(sandbox)


def test_writes_outside_the_working_dir_fail_and_its_files_vanish(sandbox, tmp_path):
    os.chmod(tmp_path, 0o777)  # even a directory anyone may write to stays out of reach
    target = tmp_path / "escaped.txt"
    result = sandbox.run(f"import os\nfor path in ({str(target)!r}, '/etc/escaped', {os.getcwd() + '/escaped'!r}):\n"
                         "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
                         "    except OSError as error:\n        print(error.errno)\n"
                         "open('/tmp/own.txt', 'w').write('mine')\nopen('local.txt', 'w').write('mine')\n"
                         "print(open('/tmp/own.txt').read())")
    assert result.ok, result
    words = result.stdout.decode().split()  # errno of each write, then what it read back from its own /tmp
    assert "wrote" not in words and set(words[:3]) <= {"2", "13", "30"} and words[3:] == ["mine"]
    assert not target.exists() and not os.path.exists("/etc/escaped") and not os.path.exists("escaped")
    assert not os.path.exists("/tmp/own.txt")  # its /tmp was its own


def test_the_trainer_environment_and_home_are_out_of_reach(sandbox, monkeypatch):
    monkeypatch.setenv("FORKLIGHT_SECRET", SECRET)
    program = ("import os, glob\nprint(os.environ.get('FORKLIGHT_SECRET'))\n"
               "for path in glob.glob('/proc/*/environ'):\n    try:\n        print(open(path, 'rb').read())\n"
               "    except OSError:\n        pass\n"
               f"print(os.listdir('/root') if os.path.isdir('/root') else [], {os.getppid()} in "
               "[int(p) for p in os.listdir('/proc') if p.isdigit()])")
    result = sandbox.run(program)
    assert result.ok, result
    assert SECRET.encode() not in result.stdout and result.stdout.startswith(b"None\n")
    assert result.stdout.rstrip().endswith(b"[] False")  # /root hidden; no process of the host visible


def test_no_network_not_even_to_a_listener_on_localhost(sandbox):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    try:
        result = sandbox.run(f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                             "    print('connected')\nexcept OSError as error:\n    print('refused', error.errno)")
        assert result.ok and result.stdout.startswith(b"refused"), result
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing arrived
    finally:
        listener.close()


KILLERS = {
    "its parent's process group": "import os\nos.killpg(os.getpgid(os.getppid()), 9)",
    "its own process group": "import os\nos.killpg(0, 9)",
    "its parent": "import os\nos.kill(os.getppid(), 9)\nprint('still here')",
    "every process it may signal": "import os\nos.kill(-1, 9)",
    "the trainer's pid": f"import os\nos.kill({os.getpid()}, 9)",  # as seen from outside
}


@pytest.mark.parametrize("target", sorted(KILLERS))
def test_signals_reach_nothing_outside_the_sandbox(sandbox, target):
    sandbox.run(KILLERS[target])  # whatever happens inside, this test process is still here
    assert_next_program_runs(sandbox)


def test_flooding_stdout_stops_at_the_cap(sandbox):
    result = sandbox.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert result.output_exceeded and not result.ok and len(result.stdout) == SMALL.output_bytes
    assert_next_program_runs(sandbox)


def test_os_system_runs_inside_the_same_walls(sandbox, tmp_path):
    os.chmod(tmp_path, 0o777)
    result = sandbox.run(f"import os\nprint(os.system('id -u; touch {tmp_path}/from_shell'))")
    assert result.ok and not (tmp_path / "from_shell").exists(), result
    assert result.stdout.split()[0] != b"0"  # not root
    assert_next_program_runs(sandbox)


def test_exit_before_doing_anything_is_a_normal_exit_with_no_output(sandbox):
    result = sandbox.run("import sys\nsys.exit(0)\nprint('never')")
    assert result.ok and result.stdout == b""


def test_many_programs_run_through_the_pool_in_order_beside_fork_bombs(sandbox):
    # A fork bomb holding all its processes while others run: the process count is per sandbox, not per uid.
    bomb = SandboxJob("import os, time\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(2)\n"
                      "            os._exit(0)\nexcept OSError:\n    time.sleep(1.5)")
    threads = "import threading\nworkers = [threading.Thread(target=print) for _ in range(4)]\n"
    jobs = [bomb, *(SandboxJob(f"{threads}[w.start() for w in workers]\nprint({i} * {i})") for i in range(6)), bomb,
            SandboxJob("while True: pass")]
    results = sandbox.run_many(jobs)
    assert [r.stdout.split()[-1] for r in results[1:7]] == [str(i * i).encode() for i in range(6)], results
    assert all(r.ok for r in results[:8]) and results[8].timed_out


def test_a_sandbox_that_cannot_start_is_refused_with_what_to_do(tmp_path):
    missing = tmp_path / "bin" / "python3"
    with pytest.raises(SandboxUnavailable, match=r"cannot start: .*unsafe_without_namespaces"):
        Sandbox(SMALL, python=str(missing)).check()


@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="needs /usr/bin/python3 for the unprivileged uid")
def test_without_namespaces_programs_still_run_under_limits_when_the_user_opts_out():
    box = Sandbox(SMALL, python="/usr/bin/python3", unsafe_without_namespaces=True)
    box.check()
    result = box.run("import os\nprint(os.getuid() != 0, open('data.txt').read())", files={"data.txt": "here"})
    assert result.ok and result.stdout.split() == [b"True", b"here"], result
    assert box.run("while True: pass", limits=SandboxLimits(wall_s=1.0)).timed_out


def test_the_launcher_uses_only_the_standard_library():
    # It runs under `python -I -S`: an import of forklight or a third-party package would fail there.
    launcher = os.path.join(os.path.dirname(sys.modules[Sandbox.__module__].__file__), "sandbox_launcher.py")
    imports = [line for line in open(launcher).read().splitlines() if line.startswith(("import ", "from "))]
    assert imports and all(line.split()[1].split(".")[0] in sys.stdlib_module_names | {"__future__"} for line in imports)
