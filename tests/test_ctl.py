"""cpusharectl status/pause/resume against service objects published on a
real private bus (the daemon end to end is in test_daemon.py and
test_dbus_policy.py); the kvm model's lines of cpusharectl check against
this machine's own measurements."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading

import pytest
from dbus_fixtures import PYTHON, SRC, system_bus  # noqa: F401
from gi.repository import GLib

from cpushare import ctl, dbus
from cpushare.models import probe, qemu


class Snapshot:
    """The fields of a seller Status that the service object reads."""

    def __init__(self, **kw):
        self.state, self.order, self.model, self.server = "idle", "cpu0", "seccomp", "m.example:7300"
        self.current_task = self.buyer_order = None
        self.tasks_done, self.cpu_seconds_sold, self.coins_earned_milli = 12, 3.25, 42
        self.connected_since, self.last_error = None, ""
        self.__dict__.update(kw)


@pytest.fixture
def glib_loop():
    loop = GLib.MainLoop()
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    yield
    loop.quit()
    t.join(5)


@pytest.fixture
def publish(system_bus, glib_loop):  # noqa: F811
    pubs = []

    def publish(instance, snapshot, pause=lambda: None, resume=lambda: None):
        service = dbus.SellerService(snapshot, pause=pause, resume=resume)
        pubs.append(dbus.Publication(dbus.connect("system"), instance, service))
        return service
    yield publish
    for p in pubs:
        p.close()


def test_status_lays_out_like_systemctl():
    props = dbus.status_properties(Snapshot(
        state="running", current_task="t77", buyer_order="b3", connected_since=1_000_000.0,
        last_error="market.example:7300: timed out"))
    text = ctl.format_status("cpu0", "org.cpushare.Seller1.cpu0", props, now=1_000_125.0)
    lines = text.splitlines()
    assert lines[0] == "\u25cf cpu0 - CPUShare seller (org.cpushare.Seller1.cpu0)" or \
        lines[0] == "* cpu0 - CPUShare seller (org.cpushare.Seller1.cpu0)"
    # Labels right-aligned to one column, as systemctl does.
    assert len({line.index(": ") for line in lines[1:]}) == 1
    fields = {k.strip(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert list(fields) == ["State", "Order", "Server", "Current task", "Tasks done", "CPU sold",
                            "Earned", "Connected since", "Last error"]
    assert fields["State"] == "running"
    assert fields["Order"] == "cpu0 (seccomp)"
    assert fields["Current task"] == "t77 (buy order b3)"
    assert fields["Tasks done"] == "12"
    assert fields["CPU sold"] == "3.250 s"
    assert fields["Earned"] == "0.042 CPUCoins"
    assert fields["Connected since"].endswith("; 2min 5s ago")
    assert fields["Last error"] == "market.example:7300: timed out"


def test_status_lists_every_instance_and_json(publish, capsys):
    publish("cpu0", Snapshot())
    publish("cpu-1", Snapshot(order="cpu-1", state="paused", coins_earned_milli=1500))
    assert ctl.main(["status"]) == 0
    out = capsys.readouterr().out
    blocks = out.strip().split("\n\n")
    assert [b.splitlines()[0].split()[1] for b in blocks] == ["cpu-1", "cpu0"]
    assert "(org.cpushare.Seller1.cpu_2d1)" in blocks[0]

    assert ctl.main(["status", "cpu-1", "--json"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["instance"] == "cpu-1" and rec["state"] == "paused"
    assert rec["coins_earned"] == "1.500" and rec["coins_earned_milli"] == 1500
    assert rec["current_task"] is None and rec["connected_since"] is None


def test_pause_and_resume_every_instance(publish, capsys):
    calls = []
    for name in ("a", "b"):
        publish(name, Snapshot(order=name), pause=lambda n=name: calls.append(("pause", n)),
                resume=lambda n=name: calls.append(("resume", n)))
    assert ctl.main(["pause", "--all"]) == 0
    assert ctl.main(["resume", "b"]) == 0
    assert calls == [("pause", "a"), ("pause", "b"), ("resume", "b")]
    assert capsys.readouterr() == ("", "")


def test_a_daemon_error_is_reported_with_status_1(publish, capsys):
    def broken():
        raise RuntimeError("the event loop did not answer")
    publish("cpu0", Snapshot(), pause=broken)
    assert ctl.main(["pause", "cpu0"]) == ctl.EXIT_FAILURE == 1
    err = capsys.readouterr().err
    assert err.startswith("cpusharectl: Pause on instance cpu0 failed: Pause() failed in process ")
    assert "the event loop did not answer" in err


def test_no_instance(system_bus, capsys):  # noqa: F811
    assert ctl.main(["status"]) == ctl.EXIT_NOT_RUNNING == 3
    assert "no cpushared instance runs on the system bus" in capsys.readouterr().err
    assert ctl.main(["status", "--json"]) == 3
    assert capsys.readouterr().out == "[]\n"
    assert ctl.main(["pause", "cpu7"]) == 3
    err = capsys.readouterr().err
    assert "no instance cpu7 runs: org.cpushare.Seller1.cpu7 is not on the system bus" in err
    assert "cpushare@cpu7.service" in err
    assert ctl.main(["resume", "--all"]) == 3


def test_no_bus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/nothing")
    for argv in (["status"], ["pause", "--all"], ["resume", "cpu0"]):
        assert ctl.main(argv) == ctl.EXIT_NO_BUS == 69
        err = capsys.readouterr().err
        assert f"cannot connect to the system bus at unix:path={tmp_path}/nothing" in err


def test_pause_needs_a_name_or_all(capsys):
    with pytest.raises(SystemExit) as e:
        ctl.main(["pause"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        ctl.main(["pause", "cpu0", "--all"])
    assert e.value.code == 2


# --- check: the kvm model's lines ------------------------------------------------

def _check_lines(env_path: str | None = None) -> tuple[int, list[str]]:
    """cpusharectl check's status and lines, run as a command."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    if env_path is not None:
        env["PATH"] = env_path
    r = subprocess.run([PYTHON, "-m", "cpushare.ctl", "check"], env=env,
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout.splitlines()


def test_check_says_what_the_kvm_model_measures_here():
    """The lines follow this machine's own measurements (models.probe), made
    again beside them: whatever KVM does here, check says the same."""
    status, lines = _check_lines()
    assert status == 0, lines
    assert lines[0].startswith("seccomp: yes (") and lines[1].startswith("kvm: "), lines
    binary = shutil.which(qemu.QEMU)
    if binary is None:
        assert lines[2:] == [f"qemu: no ({qemu.QEMU} is not installed; the kvm model needs "
                             f"the Debian package qemu-system-x86)"], lines
        return
    assert lines[2].startswith(f"qemu: yes ({binary}, QEMU emulator version "), lines
    kvm, tcg = lines[3:]
    assert tcg.startswith("accel tcg: works (probe ") and tcg.endswith(" ms)"), tcg
    state, why = probe.kvm_device_state()
    if state == "absent":
        assert kvm == f"accel kvm: absent ({why})", kvm
    elif state == "unusable":
        assert kvm == f"accel kvm: present but unusable: {why}", kvm
    else:
        choice = probe.choose("auto")
        if choice.accel == "kvm":
            assert kvm.startswith("accel kvm: works (probe "), (kvm, choice)
        else:
            assert kvm.startswith("accel kvm: present but unusable: "), (kvm, choice)


def test_check_without_qemu_says_so_and_still_succeeds():
    """No qemu on PATH (a seller of seccomp orders only): one line says so,
    nothing is measured, and seccomp alone decides the status."""
    status, lines = _check_lines(env_path="/nonexistent")
    assert status == 0, lines
    assert lines[2:] == ["qemu: no (qemu-system-x86_64 is not installed; the kvm model needs "
                         "the Debian package qemu-system-x86)"], lines
