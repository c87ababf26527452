"""Every page in man/ renders with man(1) without a warning."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")

MAN = Path(__file__).resolve().parent.parent / "man"
PAGES = sorted(p for p in MAN.iterdir() if p.suffix[1:].isdigit()) if MAN.is_dir() else []


def render(page: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MANROFFSEQ="", MANWIDTH="80", LC_ALL="C.UTF-8")
    return subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
                          env=env, capture_output=True, text=True, timeout=60)


def text(page: Path) -> str:
    """The page as a person reads it (plain text, no overstriking)."""
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    env.pop("MAN_KEEP_FORMATTING", None)
    r = subprocess.run(["man", "-E", "UTF-8", "-l", str(page)], env=env, capture_output=True,
                       text=True, timeout=60, check=True)
    return r.stdout


def test_the_pages_of_the_service_are_there():
    names = {p.name for p in PAGES}
    assert {"cpushared.8", "cpusharectl.1", "cpushare.1"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_renders_without_warnings(page):
    r = render(page)
    assert r.returncode == 0, f"{page}: man exited with {r.returncode}: {r.stderr}"
    assert r.stderr == "", f"{page}: warnings:\n{r.stderr}"
    shown = text(page)
    assert "\nNAME\n" in shown and "\nSEE ALSO\n" in shown, f"{page}: sections missing"


def test_a_broken_page_is_caught(tmp_path):
    # The check itself must see warnings: an unknown macro is one.
    bad = tmp_path / "bad.1"
    bad.write_text(".TH BAD 1\n.SH NAME\nbad \\- a page\n.XYZZY oops\n")
    assert render(bad).stderr != ""


def _options(parser) -> set[str]:
    """Every option string of an argparse parser and of its subcommands."""
    import argparse

    found = set()
    for action in parser._actions:
        found.update(s for s in action.option_strings if s not in ("-h",))
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.add(name)
                found |= _options(sub)
    return found


@pytest.mark.parametrize("page, module", [
    ("cpushare.1", "cpushare.__main__"), ("cpusharectl.1", "cpushare.ctl"),
    ("cpushared.8", "cpushare.daemon"), ("cpushare-server.8", "cpushare.market.__main__")])
def test_every_option_is_documented(page, module):
    import importlib

    shown = text(MAN / page)
    options = _options(importlib.import_module(module).build_parser())
    assert options, module
    missing = sorted(o for o in options if o not in shown)
    assert not missing, f"{page} does not mention {missing}"


def _unit_value(unit: str, key: str) -> str:
    import re

    (value,) = re.findall(rf"^{key}=(.*)$", (MAN.parent / "systemd" / unit).read_text(), re.M)
    return value


@pytest.mark.parametrize("page, unit, keys", [
    ("cpushare-server.8", "cpushare-server.service",
     ("WatchdogSec", "LimitNOFILE", "StateDirectory", "ConditionPathExists")),
    ("cpushared.8", "cpushare@.service", ("MemoryMax",))])
def test_the_pages_say_what_the_units_set(page, unit, keys):
    shown = " ".join(text(MAN / page).split())
    for key in keys:
        value = _unit_value(unit, key)
        assert f"{key}={value}" in shown or (key == "ConditionPathExists" and value in shown), \
            f"{page} does not say {key}={value} of {unit}"
