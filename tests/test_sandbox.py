"""cpushare.sandbox: correctness, the Job API, both seccomp modes, set-up
failures, and `cpushare run`.  The hostile images are in
test_sandbox_hostile.py."""

import os
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import hostile  # noqa: E402
from cpushare import bytecode, runjob, sandbox  # noqa: E402

PY = "/usr/bin/python3"
QUICK = sandbox.Limits(cpu_seconds=5, wall_seconds=20)


def run(image, input=b"", limits=QUICK):
    return sandbox.run(image, input, limits)


def env_with_src(root_dir, **extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(root_dir, "src")
    env.update(extra)
    return env


# -- what jobs compute ---------------------------------------------------------------

@pytest.mark.parametrize("status", [0, 1, 42, 255])
def test_exit_status(status, expected_mode):
    result = run(hostile.exit_with(status))
    assert result.reason == "exit"
    assert result.exit_status == status and result.signal is None
    assert result.ok == (status == 0)
    assert result.shell_status == status
    assert result.mode == expected_mode
    assert result.describe() == f"exited with status {status}"


def test_echo():
    assert run(hostile.echo(), b"hello, sandbox\n").output == b"hello, sandbox\n"
    assert run(hostile.echo(), b"").output == b""


def test_big_input_and_output_do_not_deadlock():
    data = os.urandom(6 << 20)
    result = run(hostile.echo(), data)
    assert result.ok, result
    assert result.output == data


def test_image_with_data_and_bss():
    data = b"initialised data" * 300
    bss = 3 * 4096 + 100
    image = hostile.write_region(hostile.DATA, len(data) + bss, data=data,
                                 data_address=hostile.DATA, bss_size=bss)
    result = run(image)
    assert result.ok, result
    assert result.output == data + b"\0" * bss


def test_image_with_bss_only_is_zeroed():
    image = hostile.write_region(hostile.DATA, 8192, data_address=hostile.DATA, bss_size=8192)
    assert run(image).output == b"\0" * 8192


def test_image_without_data_sees_its_text():
    image = hostile.write_region(hostile.TEXT, 64)
    result = run(image)
    assert result.ok, result
    assert result.output == (image.text + bytes(64))[:64]  # the page is zero past the text


def test_data_is_private_to_each_run():
    # a job that writes into its data then prints it: the next run starts fresh
    a = hostile.Asm()
    a.mov_rax(hostile.DATA)("c60058")                      # mov byte [rax], 'X'
    a.sys(hostile.SYS_WRITE, 1, hostile.DATA, 4).exit(0)
    image = a.image(data=b"abcd", data_address=hostile.DATA)
    assert run(image).output == b"Xbcd"
    assert run(image).output == b"Xbcd"


def test_cpu_time_is_reported():
    idle = run(hostile.exit_with(0))
    result = run(hostile.busy(300_000_000))
    assert result.ok, result
    # the busy job is billed far more than an empty one, and never more
    # CPU than it had wall-clock time (one thread)
    assert result.cpu_seconds > 5 * idle.cpu_seconds > 0
    assert result.cpu_seconds <= result.wall_seconds * 1.1 + 0.01


def test_memory_limit_refuses_big_images():
    image = hostile.exit_with(0)
    assert image.memory_size == 4096 + bytecode.DEFAULT_STACK_SIZE
    with pytest.raises(sandbox.MemoryLimitError, match=r"needs 1052672 bytes.*limit of 65536"):
        sandbox.run(image, limits=sandbox.Limits(memory=65536))
    assert issubclass(sandbox.MemoryLimitError, ValueError)
    assert run(image, limits=sandbox.Limits(memory=image.memory_size)).ok


def test_every_setup_step_has_a_name():
    ext = sandbox._ext()
    assert len(ext.STEPS) == ext.NSTEPS
    assert len(set(ext.STEPS)) == len(ext.STEPS)
    assert ext.step_name(ext.NSTEPS + 5) == f"unknown set-up step {ext.NSTEPS + 5}"


def test_limits_are_checked():
    with pytest.raises(ValueError, match="cpu_seconds"):
        sandbox.Limits(cpu_seconds=0)
    with pytest.raises(ValueError, match="output"):
        sandbox.Limits(output=-1)
    assert sandbox.Limits(cpu_seconds=1.2).cpu_rlimit == (2, 3)


# -- the Job API ---------------------------------------------------------------------

def test_job_streaming_with_a_selector():
    job = sandbox.start(hostile.echo(), QUICK)
    sel = selectors.DefaultSelector()
    sel.register(job.fileno_out(), selectors.EVENT_READ)
    got = b""
    for i in range(5):
        msg = f"message {i}\n".encode()
        job.write(msg)
        while not got.endswith(msg):
            assert sel.select(timeout=5), "no output within 5 s"
            got += job.read()
    job.close_input()
    while True:
        chunk = job.read()
        if not chunk:
            break
        got += chunk
    result = job.wait()
    assert result.ok, result
    assert got == b"".join(f"message {i}\n".encode() for i in range(5))


def test_communicate_on_a_started_job():
    job = sandbox.start(hostile.echo(), QUICK)
    assert job.pid > 0
    result = job.communicate(b"abc")
    assert result.output == b"abc"
    assert job.wait() is result


def test_pause_stops_the_wall_clock():
    job = sandbox.start(hostile.spin(), sandbox.Limits(cpu_seconds=30, wall_seconds=0.5))
    t0 = time.monotonic()
    job.pause()
    time.sleep(0.02)
    with open(f"/proc/{job.pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] == "T"
    time.sleep(0.6)  # longer than the wall limit, but paused
    job.resume()
    result = job.wait()
    real = time.monotonic() - t0
    assert result.reason == "wall-limit", result
    # paused time does not count
    assert result.wall_seconds < real - 0.4
    assert result.cpu_seconds < result.wall_seconds + 0.05


def test_kill():
    job = sandbox.start(hostile.block_on_read(), QUICK)
    job.kill()
    result = job.wait()
    assert result.reason == "killed" and result.signal == signal.SIGKILL
    assert result.shell_status == 128 + signal.SIGKILL
    assert "killed by its caller" in result.describe()


# -- Job.feed_async: the same job driven by an asyncio loop, no thread ---------------

@pytest.fixture(params=["zygote", "fork"])
def either_spawn(request, monkeypatch):
    """Jobs started through the zygote (the end comes on its status pipe) or
    forked from this process (the end comes on a pidfd)."""
    if request.param == "fork":
        monkeypatch.setattr(sandbox, "_get_zygote", lambda restart=None: None)
    return request.param

def _feed_async(image, data=b"", limits=QUICK, sink=None, during=None):
    import asyncio

    async def main():
        job = sandbox.start(image, limits)
        if during is not None:
            asyncio.get_running_loop().call_soon(during, job)
        return job, await job.feed_async(data, sink)
    return asyncio.run(main())


def test_feed_async_moves_big_input_and_output(either_spawn):
    data = os.urandom(6 << 20)
    _, result = _feed_async(hostile.echo(), data)
    assert result.ok and result.output == data, result.describe()

    class Sink:
        def __init__(self):
            self.parts = []

        def write(self, b):
            self.parts.append(bytes(b))

        def flush(self):
            pass
    sink = Sink()
    _, result = _feed_async(hostile.echo(), data, sink=sink)
    assert result.ok and result.output == b"" and b"".join(sink.parts) == data


def test_feed_async_reports_exit_status_and_cpu_time(expected_mode, either_spawn):
    _, result = _feed_async(hostile.exit_with(42))
    assert (result.exit_status, result.reason, result.mode) == (42, "exit", expected_mode)
    _, result = _feed_async(hostile.busy(200_000_000))
    assert result.ok and result.cpu_seconds > 0.01, result


def test_feed_async_enforces_the_output_and_wall_limits(either_spawn):
    _, result = _feed_async(hostile.flood(), limits=sandbox.Limits(cpu_seconds=5, wall_seconds=20,
                                                                   output=100_000))
    assert result.reason == "output-limit" and len(result.output) == 100_000, result
    _, result = _feed_async(hostile.spin(), limits=sandbox.Limits(cpu_seconds=30, wall_seconds=0.3))
    assert result.reason == "wall-limit" and 0.3 <= result.wall_seconds < 3, result


@pytest.mark.parametrize("size, limit", [(5000, 1000), (300_000, 200_000)])
def test_output_over_the_limit_is_cut_even_when_the_job_exits_first(size, limit, either_spawn):
    """The job's whole output fits in the pipe, so it exits before its reader
    sees the limit passed: the output is still cut and the result says so,
    never a clean exit."""
    data = os.urandom(size)
    limits = sandbox.Limits(cpu_seconds=5, wall_seconds=20, output=limit)
    job = sandbox.start(hostile.echo(), limits)
    job.write(data)
    job.close_input()
    def ended() -> bool:  # reaped by the zygote, or a zombie of ours
        try:
            with open(f"/proc/{job.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except (FileNotFoundError, ProcessLookupError):  # (gone while we looked)
            return True
    deadline = time.monotonic() + 10
    while not ended() and time.monotonic() < deadline:
        time.sleep(0.005)  # (it has written everything and exited)
    assert ended()
    assert job.spawned_by == either_spawn
    for result in (job.wait(), _feed_async(hostile.echo(), data, limits)[1]):
        assert result.output == data[:limit], len(result.output)
        assert (result.reason, result.exit_status, result.signal) == (
            "output-limit", None, signal.SIGKILL), result
        assert not result.ok


def test_feed_async_pause_stops_the_wall_clock(either_spawn):
    import asyncio

    async def main():
        job = sandbox.start(hostile.spin(), sandbox.Limits(cpu_seconds=30, wall_seconds=0.5))
        t0 = time.monotonic()
        job.pause()
        loop = asyncio.get_running_loop()
        loop.call_later(0.7, job.resume)  # longer than the wall limit, but paused
        result = await job.feed_async(b"")
        return result, time.monotonic() - t0
    result, real = asyncio.run(main())
    assert result.reason == "wall-limit", result
    assert result.wall_seconds < real - 0.5, (result.wall_seconds, real)


def test_feed_async_cancelled_kills_and_reaps_the_job(either_spawn):
    import asyncio

    async def main():
        job = sandbox.start(hostile.spin(), sandbox.Limits(cpu_seconds=30, wall_seconds=30))
        task = asyncio.ensure_future(job.feed_async(b""))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return job
    job = asyncio.run(main())
    assert job.wait().reason == "killed"
    assert not os.path.exists(f"/proc/{job.pid}")  # reaped, not a zombie


def test_run_from_many_threads_at_once():
    errors = []

    def worker(n):
        try:
            for i in range(8):
                payload = f"thread {n} run {i} ".encode() * (n + 1)
                result = run(hostile.echo(), payload)
                if result.output != payload or not result.ok:
                    errors.append((n, i, result))
        except Exception as e:  # pragma: no cover - reported below
            errors.append((n, e))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_many_images_from_many_threads_each_run_their_own():
    # more distinct images than the memfd cache holds, run concurrently: each
    # job must see its own text and data, never another image's
    def image(n):
        data = f"data of image {n:03d}".encode()
        a = hostile.Asm().sys(hostile.SYS_WRITE, 1, hostile.DATA, len(data))
        a.mov_edx(n)  # makes the text differ too
        return a.exit(0).image(data=data, data_address=hostile.DATA), data

    errors = []

    def worker(k):
        for i in range(30):
            n = (k * 7 + i) % 40
            img, want = image(n)
            r = run(img)
            if r.output != want:
                errors.append((n, r))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_self_test(expected_mode):
    assert sandbox.self_test() == expected_mode
    assert sandbox.mode() == expected_mode


# -- both modes ------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("CPUSHARE_TEST_SECCOMP_FILTER") == "permissive",
                    reason="already the filter-mode run")
def test_hostile_suite_in_filter_mode(root_dir):
    """The whole hostile suite and the leak tests again, in a pytest under
    a permissive seccomp filter: the kernel refuses strict mode there, so
    jobs must get the loader's own filter (its tests assert Result.mode ==
    'filter')."""
    proc = subprocess.run(
        [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(root_dir, "tests", "test_sandbox_hostile.py"),
         os.path.join(root_dir, "tests", "test_sandbox_leaks.py"),
         os.path.join(root_dir, "tests", "test_sandbox.py") + "::test_self_test"],
        cwd=root_dir, env=env_with_src(root_dir, CPUSHARE_TEST_SECCOMP_FILTER="permissive"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.skipif(os.environ.get("CPUSHARE_SANDBOX_SPAWN") == "fork",
                    reason="already the fork-spawn run")
def test_hostile_suite_with_fork_spawn(root_dir):
    """The hostile suite and the leak tests again with jobs forked straight
    from the Python process (the fallback when no zygote can start)."""
    proc = subprocess.run(
        [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(root_dir, "tests", "test_sandbox_hostile.py"),
         os.path.join(root_dir, "tests", "test_sandbox_leaks.py"),
         os.path.join(root_dir, "tests", "test_sandbox.py") + "::test_spawn_method"],
        cwd=root_dir, env=env_with_src(root_dir, CPUSHARE_SANDBOX_SPAWN="fork"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_spawn_method():
    want = os.environ.get("CPUSHARE_SANDBOX_SPAWN", "zygote")
    assert sandbox.spawn_method() == want
    job = sandbox.start(hostile.exit_with(0), QUICK)
    assert job.spawned_by == want
    assert job.wait().ok


def _zygote_pid():
    sandbox.run(hostile.exit_with(0))
    return sandbox._zygote.pid


@pytest.mark.skipif(os.environ.get("CPUSHARE_SANDBOX_SPAWN") == "fork", reason="no zygote")
def test_zygote_keeps_nothing_of_this_process():
    pid = _zygote_pid()
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    ext = sandbox._ext().__file__
    own = [line for line in maps if line.endswith(ext)]
    rest = [line for line in maps if not line.endswith(ext) and not line.endswith("[vsyscall]")]
    assert own, maps

    def span(line):
        lo, hi = line.split()[0].split("-")
        return int(lo, 16), int(hi, 16)

    own_end = max(span(line)[1] for line in own)
    # nothing else: no python, no libc, no heap; only anonymous memory: the
    # extension's own bss right after its image, and the zygote's stack and
    # job table
    assert all(len(line.split()) == 5 for line in rest), maps
    bss = [line for line in rest if span(line)[0] == own_end]
    area = [line for line in rest if line not in bss]
    assert len(bss) <= 1 and len(area) == 1, maps
    lo, hi = span(area[0])
    assert hi - lo == 512 << 10, maps
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == "cpushare-zygote"
    # the socket, the trampoline memfd, its signalfd; and, for a moment after
    # a job's end was reported, that job's status pipe (written, then closed)
    deadline = time.monotonic() + 5
    while True:
        fds = sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))
        if len(fds) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(fds) == 3, fds


@pytest.mark.skipif(os.environ.get("CPUSHARE_SANDBOX_SPAWN") == "fork", reason="no zygote")
def test_zygote_death_kills_its_jobs_and_a_new_one_starts():
    pid = _zygote_pid()
    job = sandbox.start(hostile.block_on_read(), QUICK)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(sandbox.SandboxError, match=r"zygote .* died"):
        job.wait()
    # the job died with it
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{job.pid}") and time.monotonic() < deadline:
        with open(f"/proc/{job.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    result = run(hostile.echo(), b"after the zygote died")
    assert result.output == b"after the zygote died"
    assert sandbox._zygote.pid != pid


def test_a_forked_copy_of_this_process_gets_its_own_jobs():
    run(hostile.exit_with(0))
    pid = os.fork()
    if pid == 0:
        try:
            r = run(hostile.echo(), b"child")
            os._exit(0 if r.output == b"child" else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert run(hostile.echo(), b"parent").output == b"parent"


def _in_filtered_child(root_dir, rules: str, body: str, spawn: str = "zygote"):
    """Run body in a python under a seccomp filter that allows everything
    but `rules` (python3-seccomp statements on `f`)."""
    code = textwrap.dedent("""
        import errno, seccomp, sys
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        {rules}
        f.load()
        from cpushare import sandbox
        sys.path.insert(0, {tests!r})
        import hostile
        {body}
    """).format(rules=rules, body=body, tests=os.path.join(root_dir, "tests"))
    return subprocess.run([PY, "-c", code], env=env_with_src(root_dir, CPUSHARE_SANDBOX_SPAWN=spawn),
                          capture_output=True, text=True, timeout=60)


FAILURE_PROBE = """
try:
    r = sandbox.run(hostile.exit_with(0))
    print("RAN", r)
except sandbox.SandboxError as e:
    print("SANDBOXERROR", e)
"""


@pytest.mark.parametrize("rules, call", [
    ("f.add_rule(seccomp.ERRNO(errno.EPERM), 'close_range', seccomp.Arg(0, seccomp.EQ, 6))",
     "close_range(6, ~0U): Operation not permitted"),
    ("f.add_rule(seccomp.ERRNO(errno.ENOMEM), 'mmap', seccomp.Arg(0, seccomp.EQ, 0x400000))",
     "mmap(text, PROT_READ|PROT_EXEC): Cannot allocate memory"),
    ("f.add_rule(seccomp.ERRNO(errno.EPERM), 'setrlimit', seccomp.Arg(0, seccomp.EQ, 0))",
     "setrlimit(RLIMIT_CPU): Operation not permitted"),
    ("f.add_rule(seccomp.ERRNO(errno.EACCES), 'prctl', seccomp.Arg(0, seccomp.EQ, 22))",
     "entering seccomp"),
])
@pytest.mark.parametrize("spawn", ["zygote", "fork"])
def test_setup_failure_is_reported_not_mistaken_for_the_job(root_dir, rules, call, spawn):
    proc = _in_filtered_child(root_dir, rules, FAILURE_PROBE, spawn)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("SANDBOXERROR"), proc.stdout
    assert call in proc.stdout


def test_zygote_setup_failure_falls_back_to_fork(root_dir):
    proc = _in_filtered_child(root_dir, "f.add_rule(seccomp.ERRNO(errno.EPERM), 'signalfd4')", """
r = sandbox.run(hostile.exit_with(3))
print(sandbox.spawn_method(), r.exit_status, r.mode)
print(sandbox._zygote_error)
""")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first == "fork 3 filter"
    assert "zygote set-up at signalfd4(SIGCHLD): Operation not permitted" in second


def test_self_test_refuses_a_sandbox_that_does_not_hold(root_dir):
    # getpid succeeds here if the loader's filter were not there: make the
    # loader's seccomp step "succeed" without doing anything.
    proc = _in_filtered_child(
        root_dir, "f.add_rule(seccomp.ERRNO(0), 'prctl', seccomp.Arg(0, seccomp.EQ, 22))", """
try:
    print("MODE", sandbox.self_test())
except sandbox.SandboxError as e:
    print("SANDBOXERROR", e)
""")
    assert proc.stdout.startswith("SANDBOXERROR self-test: a child that called getpid() was not killed"), \
        proc.stdout + proc.stderr


MDWE_RULES = """
import ctypes
# MemoryDenyWriteExecute=yes as systemd implements it: PR_SET_MDWE where the
# kernel has it, and its seccomp rules (no W+X mmap, no PROT_EXEC by mprotect)
MDWE = ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0)  # PR_SET_MDWE, REFUSE_EXEC_GAIN
W, X = 2, 4
f.add_rule(seccomp.ERRNO(errno.EPERM), 'mmap', seccomp.Arg(2, seccomp.MASKED_EQ, W | X, W | X))
f.add_rule(seccomp.ERRNO(errno.EPERM), 'mprotect', seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
f.add_rule(seccomp.ERRNO(errno.EPERM), 'pkey_mprotect', seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
"""


@pytest.mark.parametrize("spawn", ["zygote", "fork"])
def test_under_memory_deny_write_execute(root_dir, spawn):
    proc = _in_filtered_child(root_dir, MDWE_RULES, """
import mmap
try:  # the rules hold here
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("W+X mapping allowed")
except OSError as e:
    print("W+X refused", e.errno)
print("mdwe", MDWE)
print(sandbox.self_test())
r = sandbox.run(hostile.write_region(hostile.DATA, 8, data=b"data+bss", data_address=hostile.DATA,
                                     bss_size=4096))
print(r.exit_status, r.output)
""", spawn)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "W+X refused 1", proc.stdout
    assert lines[1] in ("mdwe 0", "mdwe -1"), proc.stdout  # PR_SET_MDWE needs Linux >= 6.3
    assert lines[2:] == ["filter", "0 b'data+bss'"], proc.stdout


def _systemd_is_pid1() -> bool:
    try:
        with open("/proc/1/comm") as f:
            return f.read().strip() == "systemd"
    except OSError:
        return False


@pytest.mark.skipif(not _systemd_is_pid1(), reason="systemd is not PID 1 on this machine "
                    "(systemd-run needs it); the permissive-filter run covers filter mode")
def test_under_systemd_hardening(root_dir):
    proc = subprocess.run(
        ["systemd-run", "--quiet", "--pipe", "--wait", "--collect",
         "-p", "MemoryDenyWriteExecute=yes", "-p", "SystemCallFilter=@system-service",
         "-p", "NoNewPrivileges=yes", f"--setenv=PYTHONPATH={root_dir}/src",
         PY, "-c", "from cpushare import sandbox; print(sandbox.self_test())"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "filter"


# -- cpushare run -----------------------------------------------------------------------

def cli(root_dir, tmp_path, image, *args, input=b""):
    path = tmp_path / "job.bin"
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        path.write_bytes(image.pack())
    return subprocess.run([PY, "-m", "cpushare", "run", *args, str(path)], input=input,
                          capture_output=True, env=env_with_src(root_dir), timeout=60), path


def test_cli_echo_and_status(root_dir, tmp_path):
    proc, _ = cli(root_dir, tmp_path, hostile.echo(), input=b"through the CLI\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"through the CLI\n"
    assert proc.stderr == b""
    proc, path = cli(root_dir, tmp_path, hostile.exit_with(7))
    assert proc.returncode == 7
    assert proc.stderr.decode() == f"cpushare run: {path}: exited with status 7\n"


def test_cli_killed_job(root_dir, tmp_path, expected_mode):
    proc, path = cli(root_dir, tmp_path, hostile.syscall_nr(57))  # fork
    sig = signal.SIGKILL if expected_mode == "strict" else signal.SIGSYS
    assert proc.returncode == 128 + sig
    assert proc.stderr.decode() == \
        f"cpushare run: {path}: killed: forbidden system call ({sig.name})\n"


def test_cli_limits(root_dir, tmp_path):
    proc, _ = cli(root_dir, tmp_path, hostile.flood(), "--output-limit", "10K")
    assert proc.returncode == 128 + signal.SIGKILL
    assert len(proc.stdout) == 10240
    assert proc.stderr.endswith(b"job.bin: killed: output limit reached (SIGKILL)\n")
    proc, _ = cli(root_dir, tmp_path, hostile.spin(), "--wall-seconds", "0.2")
    assert b"wall-clock limit" in proc.stderr
    proc, _ = cli(root_dir, tmp_path, hostile.exit_with(0), "--memory", "64K")
    assert proc.returncode == 2
    assert b"more than the limit of 65536" in proc.stderr
    proc, _ = cli(root_dir, tmp_path, hostile.rdtsc(), "--allow-tsc")
    assert proc.returncode == 0, proc.stderr


def test_cli_bad_image(root_dir, tmp_path):
    proc, path = cli(root_dir, tmp_path, b"not an image at all" * 10)
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith(f"cpushare run: {path}: bad magic")
    missing = tmp_path / "missing.bin"
    proc = subprocess.run([PY, "-m", "cpushare", "run", str(missing)], capture_output=True,
                          env=env_with_src(root_dir), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.decode() == f"cpushare run: {missing}: No such file or directory\n"


def test_parse_size():
    assert runjob.parse_size("256M") == 256 << 20
    assert runjob.parse_size("4096") == 4096
    assert runjob.parse_size("2g") == 2 << 30
    assert runjob.parse_size("10KiB") == 10 << 10
    with pytest.raises(Exception, match="invalid size"):
        runjob.parse_size("lots")
