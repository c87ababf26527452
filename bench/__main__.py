"""`make bench`: every benchmark of bench/, one table, and a JSON record.

    /usr/bin/python3 -m bench [--quick] [--only NAME,...] [--out DIR]

Each row is a ratio or a rate measured side by side in one run by one
module's ``run(quick) -> dict``, with its goal.  A module that is missing
is skipped with a printed reason; one that fails is reported as an error
row and the others still run.  The table goes to stdout, the JSON (every
module's full result, with the machine and the time) to
bench/results/<UTC time>.json.  Exit status 0 when every row that ran met
its goal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _get(result: dict, *keys: str):
    """The first of keys found in result or in result['detail']."""
    for where in (result, result.get("detail") or {}):
        for k in keys:
            if isinstance(where, dict) and where.get(k) is not None:
                return where[k]
    return None


def _num(v, fmt: str = "{:.3g}") -> str:
    if v is None:
        return "?"
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


@dataclass(frozen=True)
class Row:
    module: str
    label: str
    keys: tuple[str, ...]       # where the measured value is, first found wins
    op: str                     # "<=" or ">="
    goal: float
    unit: str
    note: Callable[[dict], str] = lambda r: ""


def _note_compute(r):
    return (f"CPU time; wall {_num(_get(r, 'wall_ratio_median_round'), '{:.3f}')}x (median), "
            f"{_num(_get(r, 'sandbox_wall_median_s'))} s a run; mode {_get(r, 'mode')}")


def _note_start(r):
    return (f"p99 {_num(_get(r, 'python_p99_us'), '{:.0f}')} us; C baseline p50 "
            f"{_num(_get(r, 'c_baseline_p50_us'), '{:.0f}')} us, ratio "
            f"{_num(_get(r, 'ratio_p50'), '{:.2f}')}x")


def _note_tasks(r):
    note = (f"bare sandbox x2: {_num(_get(r, 'sandbox_ceiling_per_second'), '{:.0f}')}/s, "
            f"ratio {_num(_get(r, 'ratio_to_ceiling'), '{:.2f}')}")
    pg = _get(r, "postgresql")
    if isinstance(pg, dict):
        note += (f"; PostgreSQL {_num(pg.get('tasks_per_second'), '{:.0f}')}/s, CPU/task "
                 f"{_num(_get(r, 'pg_vs_sqlite_cpu_per_task'), '{:.2f}')}x SQLite's")
    elif pg:
        note += f"; PostgreSQL {pg}"
    return note


def _note_relay(r):
    parts = []
    for k in ("relay_mb_per_s", "relay_mib_per_s", "tls_mb_per_s", "tls_mib_per_s"):
        v = _get(r, k)
        if v is not None:
            parts.append(f"{k} {_num(v, '{:.0f}')}")
    for k, fmt in (("ratio", "throughput ratio {}"), ("server_hwm_mib", "server RSS {} MiB")):
        v = _get(r, k)
        if v is not None:
            parts.append(fmt.format(_num(v, '{:.2f}' if k == "ratio" else '{:.0f}')))
    ceiling = _get(r, "ceiling_tls_only")
    if ceiling is not None:
        parts.append(f"ceiling here (TLS alone) {_num(ceiling, '{:.2f}')}")
    return ", ".join(parts)


def _note_study(r):
    s = (f"market {_num(_get(r, 'market_images_per_s'), '{:.1f}')} vs native "
         f"{_num(_get(r, 'native_images_per_s'), '{:.1f}')} images/s")
    r1 = _get(r, "ratio_1_per_task")
    r2 = _get(r, "market_redundancy2_images_per_s")
    return (s + (f"; 1 image a task: {r1:.2f}x" if r1 is not None else "")
            + (f"; redundancy 2: {r2:.1f}/s" if r2 is not None else ""))


def _note_conn(r):
    steps = _get(r, "steps") or [{}]
    return (f"{_num(_get(r, 'memory_per_connection_kib'), '{:.1f}')} KiB per connection "
            f"(server RSS; goal <= {_num(_get(r, 'goal_kib'), '{:.0f}')} KiB); pings per 0.1 s "
            f"at most x{_num(steps[-1].get('ping_burst'), '{:.1f}')} the mean")


def _note_attack(r):
    parts = [f"{k} +{_num(v.get('rss_growth_mib'), '{:.1f}')}"
             for k, v in (_get(r, "attacks") or {}).items()]
    served = _get(r, "honest_served")
    return ", ".join(parts) + ("; honest buyer served" if served else "; HONEST BUYER FAILED")


def _note_kvm_boot(r):
    return (f"best of {_get(r, 'rounds')}: market {_num(_get(r, 'market_seconds'), '{:.2f}')} s, "
            f"plain qemu {_num(_get(r, 'plain_seconds'), '{:.2f}')} s, the seller's argv "
            f"{_num(_get(r, 'seller_argv_seconds'), '{:.2f}')} s (flags "
            f"x{_num(_get(r, 'qemu_flags_ratio'), '{:.3f}')}, market over it "
            f"x{_num(_get(r, 'market_vs_seller_argv'), '{:.3f}')}); median ratio "
            f"{_num(_get(r, 'ratio_median'), '{:.3f}')}; the seller's qemu started "
            f"{_num(_get(r, 'market_to_booting_median_s'), '{:.2f}')} s after the request")


def _note_kvm_image(r):
    mib = (_get(r, "bytes") or 0) >> 20
    return (f"{mib} MiB: upload x{_num(_get(r, 'upload_ratio'), '{:.2f}')} "
            f"({_num(_get(r, 'upload_seconds'), '{:.2f}')} s), seller fetch "
            f"x{_num(_get(r, 'fetch_ratio'), '{:.2f}')} "
            f"({_num(_get(r, 'fetch_seconds'), '{:.2f}')} s, bytes in at "
            f"{_num(_get(r, 'fetch_bytes_in_seconds'), '{:.2f}')} s), TLS copy "
            f"{_num(_get(r, 'plain_seconds'), '{:.2f}')} s; floors x"
            f"{_num(_get(r, 'upload_floor_ratio'), '{:.2f}')}, x"
            f"{_num(_get(r, 'fetch_floor_ratio'), '{:.2f}')} (in line x"
            f"{_num(_get(r, 'plain_stored_ratio'), '{:.2f}')}); second send "
            f"{_get(r, 'second_send_buyer_bytes')} + {_get(r, 'second_send_seller_bytes')} bytes")


def _note_kvm_overhead(r):
    return (f"qemu {_num(_get(r, 'qemu_overhead_mib'), '{:.1f}')} MiB (Rss sum "
            f"{_num(_get(r, 'qemu_overhead_rss_mib'), '{:.0f}')}, Pss "
            f"{_num(_get(r, 'qemu_overhead_pss_mib'), '{:.0f}')}) + seller "
            f"{_num(_get(r, 'seller_growth_mib'), '{:.1f}')}; TCG code buffer "
            f"{_num(_get(r, 'tcg_jit_mib'), '{:.0f}')} of "
            f"{_num(_get(r, 'tcg_jit_mapping_mib'), '{:.0f}')} MiB mapped: up to "
            f"{_num(_get(r, 'worst_tcg_mib'), '{:.0f}')} MiB")


def _note_link(r):
    cpu = _get(r, "link_cpu_s_per_gb") or []
    vcpu = _get(r, "vde_cpu_s_per_gb") or []
    ecpu = _get(r, "endpoint_cpu_s_per_gb") or []
    rtt = _get(r, "rtt_us") or {}
    return (f"veth {_num(_get(r, 'veth_mb_per_s'), '{:.0f}')}, vde_plug udp "
            f"{_num(_get(r, 'vde_mb_per_s'), '{:.0f}')} MB/s (link x"
            f"{_num(_get(r, 'link_vs_vde'), '{:.2f}')}, goal >= 1), buyer's endpoint "
            f"{_num(_get(r, 'endpoint_mb_per_s'), '{:.0f}')} MB/s (x"
            f"{_num(_get(r, 'endpoint_vs_link'), '{:.2f}')} of link); CPU-s/GB link "
            + "/".join(_num(c, '{:.1f}') for c in cpu) + ", endpoint "
            + "/".join(_num(c, '{:.1f}') for c in ecpu) + ", vde_plug "
            + "/".join(_num(c, '{:.1f}') for c in vcpu)
            + f"; RTT +{_num(_get(r, 'link_added_rtt_us'), '{:.0f}')} us over veth "
            f"({_num(rtt.get('veth'), '{:.0f}')} us), endpoint "
            f"+{_num(_get(r, 'endpoint_added_rtt_us'), '{:.0f}')} us")


ROWS = (
    Row("compute", "sandbox compute overhead vs native (FS kernel)", ("measured",), "<=", 1.02,
        "x", _note_compute),
    Row("sandbox_start", "job start latency p50 (Python API)",
        ("python_p50_us", "measured"), "<=", 1000.0, "us", _note_start),
    Row("market_tasks", "market tasks/s, two local sellers",
        ("tasks_per_second", "measured"), ">=", 1000.0, "/s", _note_tasks),
    Row("relay", "relay: market CPU per byte vs plain TLS copy's",
        ("cpu_per_byte_ratio", "measured"), "<=", 2.5, "x", _note_relay),
    Row("study", "study images/s: market vs native, 2 procs", ("measured",), ">=", 0.9, "x",
        _note_study),
    Row("connections", "seller connections held, heartbeats", ("measured",), ">=", 10000.0, "",
        _note_conn),
    Row("attack_rss", "market RSS growth under the worst attack", ("measured",), "<=", 64.0,
        " MiB", _note_attack),
    Row("kvm_boot", "kvm boot to console: market vs plain qemu", ("measured",), "<=", 1.05,
        "x", _note_kvm_boot),
    Row("kvm_image", "kvm ISO send (upload, to seller) vs TLS copy", ("measured",), "<=", 2.0,
        "x", _note_kvm_image),
    Row("kvm_overhead", "kvm node memory past guest RAM (qemu+seller)", ("measured",), "<=",
        192.0, " MiB", _note_kvm_overhead),
    Row("link", "VPN link TCP throughput (iperf3, 2 local ends)", ("measured",), ">=", 100.0,
        " MB/s", _note_link),
)


def run_row(row: Row, quick: bool) -> dict:
    out = {"module": row.module, "row": row.label, "goal": f"{row.op} {row.goal:g}{row.unit}"}
    try:
        mod = importlib.import_module(f"bench.{row.module}")
    except ModuleNotFoundError as e:
        if e.name in (f"bench.{row.module}", "bench"):
            out.update(status="skipped", reason=f"bench/{row.module}.py is not there yet")
            return out
        out.update(status="error", reason=f"importing bench/{row.module}.py: {e}")
        return out
    if not hasattr(mod, "run"):
        out.update(status="skipped", reason=f"bench/{row.module}.py has no run()")
        return out
    t0 = time.monotonic()
    try:
        result = mod.run(quick=quick)
    except Exception as e:
        out.update(status="error", reason=f"{type(e).__name__}: {e}".strip()[:300],
                   traceback=traceback.format_exc())
        return out
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["result"] = result
    value = _get(result, *row.keys)
    if not isinstance(value, (int, float)):
        out.update(status="error", reason=f"bench/{row.module}.py returned no measured value "
                                          f"(looked for {', '.join(row.keys)})")
        return out
    ok = value <= row.goal if row.op == "<=" else value >= row.goal
    out.update(status="pass" if ok else "FAIL", measured=value, note=row.note(result))
    return out


def format_table(rows: list[dict]) -> str:
    head = f"{'benchmark':46}  {'measured':>11}  {'goal':>10}  {'result':7}  notes"
    lines = [head, "-" * 110]
    for r in rows:
        unit = next(x.unit for x in ROWS if x.module == r["module"])
        if "measured" in r:
            v = r["measured"]
            m = f"{v:.3f}{unit}" if unit == "x" else f"{v:,.0f}{unit}" if v >= 100 else f"{v:.1f}{unit}"
        else:
            m = "-"
        note = r.get("note") or r.get("reason", "")
        lines.append(f"{r['row']:46}  {m:>11}  {r['goal']:>10}  {r['status']:7}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench", description="Run CPUShare's benchmarks.")
    p.add_argument("--quick", action="store_true", help="fewer rounds and smaller inputs")
    p.add_argument("--only", help="comma-separated modules (" + ",".join(r.module for r in ROWS) + ")")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the JSON goes")
    args = p.parse_args(argv)
    wanted = ROWS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {r.module for r in ROWS}]
        if unknown:
            p.error(f"--only: unknown benchmark {', '.join(unknown)}")
        wanted = tuple(r for r in ROWS if r.module in names)

    started = dt.datetime.now(dt.timezone.utc)
    rows = []
    for row in wanted:
        print(f"bench: {row.module} ...", file=sys.stderr, flush=True)
        r = run_row(row, args.quick)
        if r["status"] == "error" and "traceback" in r:
            print(r["traceback"], file=sys.stderr)
        print(f"bench: {row.module}: {r['status']}"
              + (f" ({r['reason']})" if r.get("reason") else ""), file=sys.stderr, flush=True)
        rows.append(r)

    table = format_table(rows)
    print(table)
    record = {
        "started": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nresults: {path}")
    return 0 if all(r["status"] in ("pass", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
