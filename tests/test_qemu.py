"""The kvm model's launcher (models.qemu) and accelerator probe (models.probe),
with a real qemu under TCG; the KVM assertions follow what KVM measures here."""

import os
import shutil
import signal
import sys
import stat
import threading
import time
from pathlib import Path

import pytest

from cpushare.models import probe, qemu

pytestmark = pytest.mark.skipif(shutil.which(qemu.QEMU) is None,
                                reason=f"{qemu.QEMU} is not installed (qemu-system-x86)")

MiB = 1 << 20


def _echo_sector() -> bytes:
    """A guest that prints R, then echoes each byte it gets on COM1."""
    return probe.assemble((
        ("start", b"\xfa", None, "cli"),
        (None, b"\xb4R", None, "mov ah, 'R'"),
        (None, b"\xeb", ("rel8", "send"), "jmp send"),
        ("recv", b"\xba\xfd\x03", None, "mov dx, 0x3fd"),
        ("rx", b"\xec", None, "in al, dx"),
        (None, b"\xa8\x01", None, "test al, 1 (data ready)"),
        (None, b"\x74", ("rel8", "rx"), "jz rx"),
        (None, b"\xba\xf8\x03", None, "mov dx, 0x3f8"),
        (None, b"\xec", None, "in al, dx"),
        (None, b"\x88\xc4", None, "mov ah, al"),
        ("send", b"\xba\xfd\x03", None, "mov dx, 0x3fd"),
        ("tx", b"\xec", None, "in al, dx"),
        (None, b"\xa8\x20", None, "test al, 0x20 (THR empty)"),
        (None, b"\x74", ("rel8", "tx"), "jz tx"),
        (None, b"\x88\xe0", None, "mov al, ah"),
        (None, b"\xba\xf8\x03", None, "mov dx, 0x3f8"),
        (None, b"\xee", None, "out dx, al"),
        (None, b"\xeb", ("rel8", "recv"), "jmp recv"),
    ))


def _chatty_sector() -> bytes:
    """A guest that prints x on COM1 for ever."""
    return probe.assemble((
        ("start", b"\xfa", None, "cli"),
        ("send", b"\xba\xfd\x03", None, "mov dx, 0x3fd"),
        ("tx", b"\xec", None, "in al, dx"),
        (None, b"\xa8\x20", None, "test al, 0x20 (THR empty)"),
        (None, b"\x74", ("rel8", "tx"), "jz tx"),
        (None, b"\xb0x", None, "mov al, 'x'"),
        (None, b"\xba\xf8\x03", None, "mov dx, 0x3f8"),
        (None, b"\xee", None, "out dx, al"),
        (None, b"\xeb", ("rel8", "send"), "jmp send"),
    ))


def _floppy(tmp_path, sector: bytes) -> Path:
    path = tmp_path / "guest.img"
    path.write_bytes(sector)
    return path


def _start(tmp_path, sector: bytes, **kw) -> qemu.QemuRun:
    kw = {"memory": 16 * MiB, "cpus": 1, "accel": "tcg", "workdir": tmp_path, "media": "floppy",
          **kw}
    return qemu.start(_floppy(tmp_path, sector), **kw)


def _read_until(run: qemu.QemuRun, marker: bytes, timeout: float = 20) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert run.poll_output(deadline - time.monotonic()), \
            f"no {marker!r} within {timeout} s; the console said {seen[-300:]!r}"
        chunk = run.read()
        assert chunk, f"the console ended before {marker!r}: {seen[-300:]!r}"
        seen += chunk
    return seen


# -- the probe guest --------------------------------------------------------

def test_boot_sector_is_a_boot_sector_with_both_markers():
    sector = probe.boot_sector()
    assert len(sector) == 512 and sector[510:] == b"\x55\xaa"
    assert probe.START in sector and probe.END in sector
    assert sector != probe.boot_sector(steps=2)
    with pytest.raises(ValueError):
        probe.boot_sector(steps=0)


def test_the_probe_guest_reaches_its_end_marker_under_tcg():
    m = probe.measure("tcg", timeout=20)
    assert m.works, m.reason
    assert 0 < m.seconds < 5
    assert m.reason == f"probe {m.seconds * 1000:.0f} ms"


def test_a_probe_that_runs_out_of_time_says_how_far_it_got():
    m = probe.measure("tcg", timeout=3, steps=0xFFFF)
    assert not m.works and m.seconds is None
    assert "of its loop in" in m.reason and m.reason.endswith("(timed out after 3 s)"), m.reason
    assert m.estimate > 10, m.estimate
    m = probe.measure("tcg", timeout=0.01)
    assert not m.works and "did not start" in m.reason, m.reason


def test_auto_is_consistent_with_what_kvm_and_tcg_measure():
    began = time.monotonic()
    choice = probe.choose("auto")
    took = time.monotonic() - began
    assert choice.tcg is not None and choice.tcg.works, choice.tcg
    state, why = probe.kvm_device_state()
    kvm_usable = (state == "present" and choice.kvm is not None and choice.kvm.works
                  and choice.kvm.seconds <= choice.tcg.seconds)
    assert choice.accel == ("kvm" if kvm_usable else "tcg"), choice
    if choice.accel == "tcg":
        assert choice.report.startswith("tcg, since KVM is "), choice.report
        assert (why in choice.report if state != "present"
                else choice.kvm.reason in choice.report or "slower than TCG" in choice.report)
    assert took < probe.KVM_TIMEOUT + 4, took  # (about 2.3 s here)


def test_kvm_is_refused_exactly_when_it_is_unusable():
    try:
        choice = probe.choose("kvm")
    except probe.AccelError as e:
        msg = str(e)
        assert msg.startswith("accel = kvm, but KVM is "), msg
        usable = (e.kvm is not None and e.kvm.works and e.tcg is not None
                  and e.kvm.seconds <= e.tcg.seconds)
        assert not usable, (e.kvm, e.tcg)
        if e.kvm is not None and not e.kvm.works:
            assert e.kvm.reason in msg
    else:
        assert choice.accel == "kvm" and choice.kvm.works
        assert choice.kvm.seconds <= choice.tcg.seconds


def test_tcg_as_set_measures_nothing():
    began = time.monotonic()
    choice = probe.choose("tcg")
    assert choice.accel == "tcg" and choice.kvm is None and time.monotonic() - began < 0.5


def test_without_a_kvm_device_auto_takes_tcg_and_kvm_says_absent(tmp_path):
    missing = str(tmp_path / "kvm")
    choice = probe.choose("auto", kvm_device=missing)
    assert choice.accel == "tcg" and f"absent (no {missing})" in choice.report
    assert choice.kvm is None
    with pytest.raises(probe.AccelError, match="KVM is absent"):
        probe.choose("kvm", kvm_device=missing)
    lines = probe.describe(kvm_device=missing)
    assert lines[0] == f"kvm: absent (no {missing})"
    assert lines[1].startswith("tcg: works (probe ") and lines[1].endswith(" ms)")


def test_a_kvm_device_that_does_not_open_is_unusable(tmp_path):
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    device.chmod(0)
    if os.access(device, os.R_OK | os.W_OK):  # root opens it anyway: use a directory
        device.unlink()
        device.mkdir()
    state, why = probe.kvm_device_state(str(device))
    assert state == "unusable" and str(device) in why


def test_decide_names_why_kvm_is_not_taken():
    tcg = probe.Measurement(True, 0.1, "probe 100 ms")
    slow = probe.Measurement(True, 0.5, "probe 500 ms")
    fast = probe.Measurement(True, 0.01, "probe 10 ms")
    hung = probe.Measurement(False, None, "the probe guest ran 1/16 of its loop in 1.00 s, "
                                          "about 16.0 s for all of it (timed out after 2 s)", 16.0)
    present = ("present", "/dev/kvm, API version 12")
    assert probe.decide("auto", present, fast, tcg).accel == "kvm"
    assert probe.decide("kvm", present, fast, tcg).report == \
        "kvm: probe 10 ms against TCG's 100 ms"
    with pytest.raises(probe.AccelError, match="5.0 times slower than TCG"):
        probe.decide("kvm", present, slow, tcg)
    with pytest.raises(probe.AccelError, match=r"timed out after 2 s\); about 160 times slower"):
        probe.decide("kvm", present, hung, tcg)
    with pytest.raises(probe.AccelError, match="cannot open /dev/kvm read-write: Permission"):
        probe.decide("kvm", ("unusable", "cannot open /dev/kvm read-write: Permission denied"),
                     None, tcg)
    choice = probe.decide("auto", present, slow, tcg)
    assert choice.accel == "tcg" and "5.0 times slower" in choice.report
    with pytest.raises(ValueError):
        probe.decide("fast", present, fast, tcg)


# -- the launcher -----------------------------------------------------------

def test_the_command_line_is_hardened(tmp_path):
    run = _start(tmp_path, probe.boot_sector())
    try:
        argv = run.argv
        assert "-nodefaults" in argv and "-no-user-config" in argv
        assert argv[argv.index("-sandbox") + 1] == qemu.SANDBOX
        assert "spawn=deny" in qemu.SANDBOX and "elevateprivileges=deny" in qemu.SANDBOX
        assert argv[argv.index("-nic") + 1] == "none"
        assert argv[argv.index("-accel") + 1] == f"tcg,split-wx=on,tb-size={qemu.TB_SIZE_MIB}"
        assert "usb=off" in argv[argv.index("-machine") + 1]
        assert "-netdev" not in argv and "-device" not in argv
        assert stat.S_IMODE(os.stat(run.workdir).st_mode) == 0o700
        with open(f"/proc/{run.pid}/environ", "rb") as f:
            assert f.read() == b""
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{run.pid}/fd"))
        assert fds[:3] == [0, 1, 2]
        with open(f"/proc/{run.pid}/status") as f:
            assert "Seccomp:\t2" in f.read()  # qemu's -sandbox
    finally:
        run.kill()
        run.wait()
    assert not run.workdir.exists()
    cd = qemu.command(Path("/srv/a,b.iso"), memory=256 * MiB, cpus=2, accel="kvm")
    drive = cd[cd.index("-drive") + 1]
    assert drive.startswith("file=/srv/a,,b.iso,format=raw,media=cdrom,readonly=on,")
    assert cd[cd.index("-boot") + 1].startswith("order=d")
    assert cd[cd.index("-m") + 1] == "256M" and cd[cd.index("-smp") + 1] == "2"
    assert cd[cd.index("-accel") + 1] == "kvm"
    with pytest.raises(ValueError):
        qemu.command(Path("x.iso"), memory=256 * MiB, cpus=0, accel="tcg")
    with pytest.raises(ValueError):
        qemu.command(Path("x.iso"), memory=256 * MiB, cpus=1, accel="hvf")


def test_the_console_carries_the_guests_output_to_its_end(tmp_path):
    run = _start(tmp_path, probe.boot_sector(steps=1))
    assert run.accel == "tcg"
    run.close_input()  # the guest goes on without input
    seen = _read_until(run, probe.END)
    assert seen.index(probe.START) < seen.index(b".") < seen.index(probe.END)
    run.kill()
    run.kill()  # idempotent
    result = run.wait()
    assert result.signal == signal.SIGKILL and result.exit_status is None
    assert result.reason == "killed" and result.mode == "tcg" and result.output == b""
    assert result.cpu_seconds > 0 and result.wall_seconds > 0
    assert run.wait() is result
    while run.read():
        pass
    assert run.read() == b""
    run.kill()  # after the end: nothing


def test_console_input_reaches_the_guest(tmp_path):
    run = _start(tmp_path, _echo_sector())
    try:
        _read_until(run, b"R")
        run.write(b"hello, guest")
        assert _read_until(run, b"guest") == b"hello, guest"
    finally:
        run.kill()
        run.wait()


def test_the_console_budget_kills_a_chatty_guest(tmp_path):
    run = _start(tmp_path, probe.boot_sector(steps=1), console_budget=10)
    got = b""
    while chunk := run.read():
        got += chunk
    assert got == probe.START[:10]
    result = run.wait()
    assert result.reason == "output-limit" and result.signal == signal.SIGKILL


def test_pause_stops_the_guests_cpu_and_resume_continues(tmp_path):
    run = _start(tmp_path, probe.boot_sector(steps=0xFFFF))  # minutes of counting
    try:
        _read_until(run, probe.START)
        time.sleep(0.3)
        before = run.cpu_seconds()
        time.sleep(1)
        running = run.cpu_seconds() - before
        assert running > 0.5, running
        run.pause()
        assert run.paused
        time.sleep(0.2)
        before = run.cpu_seconds()
        time.sleep(1)
        paused = run.cpu_seconds() - before
        assert paused < 0.05, paused
        run.resume()
        assert not run.paused
        before = run.cpu_seconds()
        time.sleep(1)
        assert run.cpu_seconds() - before > 0.5
    finally:
        run.kill()
    result = run.wait()
    assert result.wall_seconds < time.monotonic() - run._start - 1  # the pause did not count
    assert result.cpu_seconds >= before


def test_a_console_nobody_reads_holds_the_guest_but_not_qmp(tmp_path):
    run = _start(tmp_path, _chatty_sector(), console_budget=1 << 40)
    try:
        _read_until(run, b"x")
        time.sleep(1.5)  # the console's pipe fills
        began = time.monotonic()
        run.pause()
        run.resume()
        assert time.monotonic() - began < 2
        got = 0
        while got < 256 << 10:
            got += len(run.read())
    finally:
        run.kill()
    assert run.wait().reason == "killed"


def test_powerdown_kills_a_guest_that_ignores_it_after_the_grace(tmp_path):
    run = _start(tmp_path, probe.boot_sector(steps=1))
    _read_until(run, probe.END)
    began = time.monotonic()
    run.powerdown(grace=0.5)
    assert time.monotonic() - began < 0.5  # it does not wait
    result = run.wait()
    assert 0.4 < time.monotonic() - began < 5
    assert result.reason == "killed" and result.signal == signal.SIGKILL
    run.pause()  # after the end: nothing
    run.powerdown()


def test_launch_errors(tmp_path):
    with pytest.raises(qemu.LaunchError, match="No such file"):
        qemu.start(tmp_path / "missing.iso", memory=64 * MiB, cpus=1, accel="tcg",
                   workdir=tmp_path)
    with pytest.raises(qemu.LaunchError, match="Is a directory"):
        qemu.start(tmp_path, memory=64 * MiB, cpus=1, accel="tcg", workdir=tmp_path)
    with pytest.raises(qemu.LaunchError, match="not a regular file"):
        qemu.start(Path("/dev/null"), memory=64 * MiB, cpus=1, accel="tcg", workdir=tmp_path)
    with pytest.raises(qemu.LaunchError, match="not found"):
        _start(tmp_path, probe.boot_sector(), qemu=str(tmp_path / "no-qemu"))
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: something is wrong' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(qemu.LaunchError, match="exited at once.*something is wrong"):
        _start(tmp_path, probe.boot_sector(), qemu=str(fake))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("qemu-")] == []


def test_a_long_workdir_still_reaches_qmp(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    run = _start(deep, probe.boot_sector(steps=1))
    run.pause()
    run.resume()
    run.kill()
    assert run.wait().reason == "killed"


def test_a_run_in_no_workdir_cleans_up_its_own(tmp_path):
    run = qemu.start(_floppy(tmp_path, probe.boot_sector(steps=1)), memory=16 * MiB, cpus=1,
                     accel="tcg", media="floppy")
    where = run.workdir.parent
    assert where.exists()
    run.kill()
    run.wait()
    assert not where.exists()


def _guest_iso() -> Path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import guestiso
    except ImportError as e:
        pytest.skip(f"no tests/guestiso.py: {e}")
    try:
        return guestiso.iso_path("marker")
    except guestiso.GuestIsoError as e:
        pytest.skip(f"no guest ISO: {e}")


def test_the_guest_iso_boots_pauses_resumes_and_powers_off(tmp_path):
    iso = _guest_iso()
    run = qemu.start(iso, memory=256 * MiB, cpus=1, accel="tcg", workdir=tmp_path)
    try:
        boot = _read_until(run, b"CPUSHARE-GUEST-READY", timeout=120)
        assert b"CPUSHARE-GUEST-READY" in boot
        run.write(b"echo hello-42\n")
        _read_until(run, b"\nhello-42\r\n")
        run.pause()
        while run.poll_output(0.2):  # what it printed before it stopped
            run.read()
        before = run.cpu_seconds()
        assert not run.poll_output(1.5), "a paused guest printed"  # (uptime: every second)
        assert run.cpu_seconds() - before < 0.05
        run.resume()
        _read_until(run, b"cpushare-guest: uptime ", timeout=10)
        run.powerdown(grace=30)
        rest = b""
        while chunk := run.read():
            rest += chunk
        result = run.wait()
        assert result.exit_status == 0 and result.reason == "exit", (result, rest[-2000:])
        assert result.wall_seconds > 0 and result.cpu_seconds > 1
    finally:
        run.kill()
        run.wait()


def test_a_power_off_asked_before_the_guest_listens_still_powers_it_off(tmp_path):
    """The first press of the power button comes while the guest is still in
    its firmware (and is lost); the presses that follow reach it once it
    listens: qemu exits 0 (powered off, not killed at the grace)."""
    iso = _guest_iso()
    run = qemu.start(iso, memory=256 << 20, cpus=1, accel="tcg", workdir=tmp_path)
    try:
        run.powerdown(grace=240)  # at once: SeaBIOS, not the guest's acpid, sees it
        t = threading.Thread(target=lambda: [None for _ in iter(run.read, b"")], daemon=True)
        t.start()
        result = run.wait()
    finally:
        run.kill()
    assert (result.exit_status, result.reason) == (0, "exit"), result
