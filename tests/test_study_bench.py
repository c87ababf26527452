"""`make bench`'s aggregator (bench/__main__.py): rows, goals, skips, errors,
the JSON record; with stand-in benchmark modules, so it runs in a second."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench.__main__ as agg  # noqa: E402


@pytest.fixture
def fake_modules(monkeypatch):
    """bench.compute passes, bench.study misses its goal, bench.relay raises,
    bench.connections is not there, bench.market_tasks answers in its own
    shape, bench.sandbox_start returns no number; every other row's module
    (the kvm and link ones, attack_rss: minutes of qemu, iperf3 and attacks
    if they ran for real) measures exactly its goal."""
    def mod(name, run):
        m = types.ModuleType(f"bench.{name}")
        m.run = run
        monkeypatch.setitem(sys.modules, f"bench.{name}", m)

    mod("compute", lambda quick: {"measured": 1.004, "detail": {"mode": "strict"}})
    mod("study", lambda quick: {"measured": 0.5, "detail": {"market_images_per_s": 10.0,
                                                            "native_images_per_s": 20.0}})

    def boom(quick):
        raise RuntimeError("the relay fell over")
    mod("relay", boom)
    mod("market_tasks", lambda quick: {"tasks_per_second": 1500.0})
    mod("sandbox_start", lambda quick: {"detail": {}})
    monkeypatch.setitem(sys.modules, "bench.connections", None)   # import fails
    for row in agg.ROWS:
        if row.module not in FAKED:
            mod(row.module, lambda quick, goal=row.goal: {"measured": goal})


FAKED = ("compute", "study", "relay", "market_tasks", "sandbox_start", "connections")


def test_rows_goals_skips_and_errors(fake_modules, tmp_path, capsys):
    status = agg.main(["--quick", "--out", str(tmp_path)])
    assert status == 1                                  # study failed, relay errored
    out = capsys.readouterr().out
    by = {r.module: r for r in agg.ROWS}
    record = json.loads(next(tmp_path.glob("*-quick.json")).read_text())
    rows = {r["module"]: r for r in record["rows"]}
    assert rows["compute"]["status"] == "pass" and rows["compute"]["measured"] == 1.004
    assert rows["study"]["status"] == "FAIL"
    assert rows["market_tasks"]["status"] == "pass" and rows["market_tasks"]["measured"] == 1500.0
    assert rows["relay"]["status"] == "error" and "the relay fell over" in rows["relay"]["reason"]
    assert rows["sandbox_start"]["status"] == "error"
    assert "no measured value" in rows["sandbox_start"]["reason"]
    for m in set(by) - set(FAKED):
        assert rows[m]["status"] == "pass" and rows[m]["measured"] == by[m].goal, rows[m]
    assert record["quick"] is True and record["machine"]["cpus"] >= 1
    for m in ("compute", "study", "relay", "market_tasks"):
        assert by[m].label in out
    assert "1.004x" in out and "market 10.0 vs native 20.0 images/s" in out


def test_missing_module_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.delitem(sys.modules, "bench.nothing_here", raising=False)
    row = agg.Row("nothing_here", "a benchmark not written yet", ("measured",), ">=", 1.0, "x")
    r = agg.run_row(row, quick=True)
    assert r["status"] == "skipped" and "bench/nothing_here.py is not there yet" in r["reason"]


def test_only_selects_and_refuses_unknown(fake_modules, tmp_path, capsys):
    assert agg.main(["--only", "compute", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("*.json")
    assert [r["module"] for r in json.loads(path.read_text())["rows"]] == ["compute"]
    with pytest.raises(SystemExit):
        agg.main(["--only", "nonsense", "--out", str(tmp_path)])
