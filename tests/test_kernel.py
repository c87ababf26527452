"""Kernel capability probes and `cpusharectl check`, including a real refusal.

The refusal is tested for real: a child process installs a seccomp filter
(python3-seccomp) that makes the kernel answer as one built without
CONFIG_SECCOMP does (prctl's seccomp options fail with EINVAL, the seccomp
system call with ENOSYS), then runs the probe and `cpusharectl check`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cpushare import ctl, kernel

SRC = str(Path(__file__).resolve().parent.parent / "src")

# Filters the child installs before it probes, as python3-seccomp rules.
NO_CONFIG_SECCOMP = """
f.add_rule(seccomp.ERRNO(errno.EINVAL), "prctl", seccomp.Arg(0, seccomp.EQ, 21))
f.add_rule(seccomp.ERRNO(errno.EINVAL), "prctl", seccomp.Arg(0, seccomp.EQ, 22))
f.add_rule(seccomp.ERRNO(errno.ENOSYS), "seccomp")
"""
UNRELATED_FILTER = """
f.add_rule(seccomp.ERRNO(errno.EPERM), "ptrace")
"""
NO_SECCOMP_SYSCALL = """
f.add_rule(seccomp.ERRNO(errno.ENOSYS), "seccomp")
"""
NO_FILTER_SUPPORT = """
f.add_rule(seccomp.ERRNO(errno.EINVAL), "prctl", seccomp.Arg(0, seccomp.EQ, 22))
f.add_rule(seccomp.ERRNO(errno.ENOSYS), "seccomp")
"""


def under_filter(rules: str, body: str) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter after loading a filter made of `rules`."""
    code = textwrap.dedent("""
        import errno, json, sys
        import seccomp
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    """) + textwrap.dedent(rules) + "f.load()\n" + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)


PROBE_AS_JSON = """
from dataclasses import asdict
from cpushare import kernel
r = kernel.probe()
try:
    kernel.require_seccomp(r)
    error = None
except kernel.KernelError as e:
    error = str(e)
print(json.dumps(dict(asdict(r), lines=r.lines(), error=error)))
"""

CHECK = """
from cpushare import ctl
sys.exit(ctl.main(["check"]))
"""


def probe_under(rules: str) -> dict:
    proc = under_filter(rules, PROBE_AS_JSON)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def this_process_mode() -> int | None:
    return kernel.status_seccomp()[0]


# -- the machine as it is --------------------------------------------------------

def test_probe_matches_what_the_kernel_says_here():
    mode, _ = kernel.status_seccomp()
    if mode is None:
        pytest.fail("no Seccomp: line in /proc/self/status: these machines have CONFIG_SECCOMP")
    r = kernel.probe()
    assert r.seccomp and r.seccomp_filter
    assert r.in_filter == (mode == 2)
    assert r.seccomp_strict == (mode == 0)
    if mode == 0:
        assert r.seccomp_reason == "strict mode; filter mode available"
        assert r.lines()[0] == "seccomp: yes (strict mode; filter mode available)"
    assert kernel.require_seccomp(r) is r


def test_kernel_config_says_seccomp_where_readable():
    config, path = kernel.kernel_config()
    if path is None:
        assert config == {}
    else:
        assert config.get("CONFIG_SECCOMP") == "y", f"{path} lacks CONFIG_SECCOMP=y"


def test_status_seccomp_reads_both_lines(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t3\nCpus_allowed:\tf\n")
    assert kernel.status_seccomp(str(status)) == (2, 3)
    status.write_text("Name:\tx\n")  # a kernel without CONFIG_SECCOMP
    assert kernel.status_seccomp(str(status)) == (None, None)
    assert kernel.status_seccomp(str(tmp_path / "missing")) == (None, None)


def test_kvm_probe_reports_what_the_ioctl_says(tmp_path):
    r = kernel.probe()
    if os.path.exists(kernel.KVM_DEVICE):
        try:
            os.close(os.open(kernel.KVM_DEVICE, os.O_RDWR))
        except OSError as e:
            assert not r.kvm and e.strerror in r.kvm_reason
        else:
            assert r.kvm and r.kvm_reason == "/dev/kvm, API version 12"
            assert "kvm: yes (/dev/kvm, API version 12)" in r.lines()
    else:
        assert not r.kvm and "does not exist" in r.kvm_reason
    missing = kernel.probe(kvm_device=str(tmp_path / "kvm"))
    assert not missing.kvm and missing.kvm_reason.endswith(
        "kvm does not exist (no KVM module, or no hardware virtualisation)")
    not_kvm = kernel.probe(kvm_device="/dev/null")
    assert not not_kvm.kvm
    assert not_kvm.kvm_reason.startswith("ioctl(KVM_GET_API_VERSION) on /dev/null failed")


def test_cpusharectl_check_here(capsys):
    assert ctl.main(["check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("seccomp: yes (")
    assert out[1].startswith("kvm: ")


def test_cpusharectl_runs_as_a_module():
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.run([sys.executable, "-m", "cpushare.ctl", "check"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("seccomp: yes")
    proc = subprocess.run([sys.executable, "-m", "cpushare.ctl"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "COMMAND" in proc.stderr


# -- a kernel without CONFIG_SECCOMP, made real with a filter --------------------

def test_probe_without_config_seccomp_reports_no_seccomp():
    r = probe_under(NO_CONFIG_SECCOMP)
    assert not r["seccomp_strict"] and not r["seccomp_filter"]
    assert r["seccomp_reason"] == ("prctl(PR_GET_SECCOMP) failed with EINVAL: "
                                   "this kernel was built without CONFIG_SECCOMP")
    assert r["lines"][0] == f"seccomp: no ({r['seccomp_reason']})"
    # /proc/self/status still shows the filter that stands in for the
    # missing kernel option; the probe reports it but goes by prctl
    assert any("Seccomp: 2" in n for n in r["notes"])
    assert r["in_filter"]
    assert "CONFIG_SECCOMP=y" in r["error"] and r["error"].startswith("no seccomp: prctl(PR_GET_SECCOMP)")


def test_cpusharectl_check_without_config_seccomp_exits_1():
    proc = under_filter(NO_CONFIG_SECCOMP, CHECK)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith("seccomp: no (prctl(PR_GET_SECCOMP) failed with EINVAL")
    assert "\nkvm: " in proc.stdout
    assert proc.stderr.startswith("cpusharectl check: no seccomp: ")
    assert "CONFIG_SECCOMP" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_require_seccomp_raises_naming_config_seccomp():
    proc = under_filter(NO_CONFIG_SECCOMP, """
        from cpushare import kernel
        try:
            kernel.require_seccomp()
        except kernel.KernelError as e:
            print(e)
            sys.exit(3)
    """)
    assert proc.returncode == 3, proc.stderr
    assert "CONFIG_SECCOMP" in proc.stdout


# -- other kernels and hosts -----------------------------------------------------

def test_under_an_unrelated_filter_strict_mode_is_refused_but_filters_work():
    r = probe_under(UNRELATED_FILTER)
    assert r["in_filter"] and not r["seccomp_strict"] and r["seccomp_filter"]
    assert r["seccomp_reason"].startswith("filter mode; strict mode refused: this process already "
                                          "runs under")
    assert r["error"] is None
    proc = under_filter(UNRELATED_FILTER, CHECK)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("seccomp: yes (filter mode; strict mode refused")


def test_without_the_seccomp_syscall_filters_are_found_through_prctl():
    # a kernel older than 3.17 has prctl's filter mode but no seccomp(2)
    r = probe_under(NO_SECCOMP_SYSCALL)
    assert r["seccomp_filter"] and r["in_filter"]
    assert r["error"] is None


def test_without_filter_support_under_a_filter_nothing_is_usable():
    r = probe_under(NO_FILTER_SUPPORT)
    assert not r["seccomp_strict"] and not r["seccomp_filter"]
    assert "no usable mode" in r["seccomp_reason"]
    assert "CONFIG_SECCOMP" in r["error"]
    assert under_filter(NO_FILTER_SUPPORT, CHECK).returncode == 1


def test_filter_in_the_child_does_not_leak_into_this_process():
    probe_under(NO_CONFIG_SECCOMP)
    assert kernel.probe().seccomp
