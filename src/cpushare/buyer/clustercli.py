"""``cpushare cluster``: boot an ISO on N sellers' nodes and steer it.

    cpushare cluster up --order FILE.buy --iso IMAGE.iso --nodes N [--detach]
        [--listen ADDR:PORT [--advertise HOST:PORT] [--subnet CIDR] [--no-dhcp]
         [--nfs DIR]]
    cpushare cluster status [NAME] [--json]
    cpushare cluster console NAME NODE [--until TEXT] [--timeout S]
    cpushare cluster down NAME

The process that holds a cluster is its agent (`clusteragent`): ``up`` in
the foreground, or a process of its own with --detach.  The other
subcommands see the cluster through its state directory and talk to the
agent on its control socket.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..order import MAX_SECONDS, OrderError, load_buy
from .cluster import END_STATES
from .clusteragent import Report, run_agent
from .clusternet import network_lines
from .clusternetargs import NetSpec, add_net_arguments, net_spec
from .clusterstate import (FINAL_STATES, ClusterError, ConsoleReader, StateDir, clusters_dir,
                           summary_lines)

EPILOG = """\
up        lease N nodes that boot IMAGE.iso; show each node's changes
status    the clusters, or one: each node's seller, state, CPU time, cost
console   a node's console so far, then live; standard input goes to it
down      power every node off, settle, and say what each cost

Exit status: 0 on success; 1 when the market refused or failed (funds, a
node lost, not running in time), no such cluster or node; 2 for a usage
error or an unusable file; 128 + the signal after SIGINT, SIGTERM or SIGHUP
(the nodes powered off first).  See cpushare-cluster(1).
"""

UP_EPILOG = """\
In the foreground each change of a node is one line: node, state, seller,
message.  SIGINT (Ctrl-C), SIGTERM and SIGHUP power every node off, settle
the leases and exit.  With --detach it returns once every node runs, and a
process of its own holds the cluster until `cpushare cluster down NAME`.
"""

DETACH_TIMEOUT = 600.0  # s: --detach waits this long for every node to run


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_SECONDS} seconds, not {text}")
    return value


def _whole_seconds(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not 1 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_SECONDS}, not {text}")
    return value


def _nodes(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of nodes") from None
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"must be 1 to 4096, not {text}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("up", help="lease N nodes booting an ISO and hold them",
                       description="Lease N nodes booting an ISO and hold them.",
                       epilog=UP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--order", required=True, metavar="FILE.buy", type=Path,
                   help="buyer credentials and a buy order of the kvm model")
    p.add_argument("--iso", required=True, metavar="IMAGE.iso", type=Path,
                   help="the bootable ISO 9660 image (sent once; a market that holds it "
                        "takes no byte)")
    p.add_argument("--nodes", required=True, metavar="N", type=_nodes,
                   help="how many nodes (1 to the buy order's max_nodes)")
    p.add_argument("--name", metavar="NAME",
                   help="the cluster's name (default: the ISO's file name without .iso)")
    p.add_argument("--detach", action="store_true",
                   help="return once every node runs; a background agent holds the cluster")
    p.add_argument("--cpu-seconds", metavar="S", type=_whole_seconds,
                   help="CPU seconds of each node's lease (default: the buy order's "
                        "max_cpu_seconds)")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds,
                   help="power the nodes off unless every node runs within SECONDS "
                        f"(default: {DETACH_TIMEOUT:g} with --detach, none otherwise)")
    add_net_arguments(p)

    p = sub.add_parser("status", help="show the clusters, or one",
                       description="Show each node's seller, state, CPU seconds and cost.")
    p.add_argument("name", metavar="NAME", nargs="?", help="only this cluster")
    p.add_argument("--json", action="store_true",
                   help="print the status as JSON (status.json, and agent_alive)")

    p = sub.add_parser("console", help="follow a node's console; stdin goes to it",
                       description="Print a node's console so far and follow it; lines read "
                                   "on standard input are typed on it.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("node", metavar="NODE", help="node0, node1, ...")
    p.add_argument("--until", metavar="TEXT",
                   help="exit 0 once the console has printed TEXT (from its start)")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds,
                   help="exit 1 after SECONDS (default: follow until the node ends)")

    p = sub.add_parser("down", help="power every node off and settle",
                       description="Power every node off, wait until each lease is "
                                   "settled, and print what each node used and cost.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=300.0,
                   help="give up waiting after SECONDS (default 300)")


def _err(text: str) -> None:
    print(f"cpushare cluster: {text}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    try:
        return {"up": _up, "status": _status, "console": _console,
                "down": _down}[args.cluster_command](args)
    except ClusterError as e:
        _err(e.message)
        return e.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # (stdout closed: `status | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# --- up ------------------------------------------------------------------------

def _up(args) -> int:
    try:
        order = load_buy(args.order)
    except OrderError as e:
        raise ClusterError(str(e), 2) from None
    if order.model != "kvm":
        raise ClusterError(f"{args.order}: a buy order of the {order.model} model: a cluster "
                           f"needs one of the kvm model", 2)
    if args.nodes > order.max_nodes:
        raise ClusterError(f"--nodes {args.nodes}: {args.order} allows at most "
                           f"{order.max_nodes} nodes (its max_nodes)", 2)
    if args.cpu_seconds is not None and args.cpu_seconds > order.max_cpu_seconds:
        raise ClusterError(f"--cpu-seconds {args.cpu_seconds}: {args.order} allows at most "
                           f"{order.max_cpu_seconds} (its max_cpu_seconds)", 2)
    try:
        net = net_spec(args, args.nodes)
    except ValueError as e:
        raise ClusterError(str(e), 2) from None
    iso = args.iso.absolute()
    try:
        with open(iso, "rb"):
            pass
    except OSError as e:
        raise ClusterError(f"{args.iso}: cannot read the ISO: {e.strerror}", 2) from None
    if not iso.is_file():
        raise ClusterError(f"{args.iso}: not a regular file", 2)
    from ..models import ImageError
    from ..models.kvm import check_iso
    try:
        check_iso(iso, str(args.iso))
    except ImageError as e:
        raise ClusterError(str(e), 2) from None
    name = args.name
    if name is None:
        name = iso.name[:-4] if iso.name.lower().endswith(".iso") else iso.name
    try:
        sd = StateDir(name)
    except ClusterError as e:
        if args.name is None:
            raise ClusterError(f"{e.message}: give one with --name", 2) from None
        raise
    cpu_ms = None if args.cpu_seconds is None else args.cpu_seconds * 1000
    timeout = args.timeout if args.timeout is not None or not args.detach else DETACH_TIMEOUT
    lock_fd = sd.lock()
    if not args.detach:
        return run_agent(sd, lock_fd, order, iso, args.nodes, cpu_ms, timeout, Report(), net)
    return _detach(sd, lock_fd, args.order.absolute(), iso, args.nodes, cpu_ms, timeout, net)


def _detach(sd: StateDir, lock_fd: int, order: Path, iso: Path, nodes: int,
            cpu_ms: int | None, timeout: float, net: NetSpec | None) -> int:
    """Start the agent in a session of its own; relay what it reports until
    every node runs (0) or it gives up (its status)."""
    import cpushare
    r, w = os.pipe()
    argv = [sys.executable, "-m", "cpushare.buyer.clusteragent", "--name", sd.name,
            "--order", str(order), "--iso", str(iso), "--nodes", str(nodes),
            "--timeout", repr(timeout), "--lock-fd", str(lock_fd), "--report-fd", str(w)]
    if cpu_ms is not None:
        argv += ["--cpu-ms", str(cpu_ms)]
    if net is not None:
        argv += net.argv()
    env = dict(os.environ)
    pkg_root = str(Path(cpushare.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        with open(sd.log_path, "ab") as logf:
            os.chmod(sd.log_path, 0o600)
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 pass_fds=(lock_fd, w), start_new_session=True, cwd="/",
                                 env=env)
    except OSError as e:
        raise ClusterError(f"cannot start the agent: {e.strerror}") from None
    finally:
        os.close(w)
        os.close(lock_fd)
    status = None
    with os.fdopen(r, "r") as reports:
        interrupted = None
        while status is None:
            try:
                line = reports.readline()
            except KeyboardInterrupt:
                interrupted = 130
                _err(f"interrupted: powering the nodes of {sd.name} off")
                os.kill(p.pid, signal.SIGTERM)
                continue
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if "line" in msg:
                print(msg["line"], flush=True)
            elif "error" in msg:
                _err(msg["error"])
            elif "ready" in msg:
                print(msg["ready"], flush=True)
                print(f"{sd.name}: see cpushare cluster status {sd.name}; "
                      f"cpushare cluster down {sd.name} to end it", flush=True)
                status = 0
            elif "exit" in msg:
                status = msg["exit"] if isinstance(msg["exit"], int) else 1
        if interrupted is not None:
            return interrupted
    if status is None:
        code = p.poll()
        _err(f"the agent of {sd.name} stopped reporting"
             + (f" (it exited with status {code})" if code is not None else "")
             + f"; see {sd.log_path}")
        return 1
    return status


# --- status --------------------------------------------------------------------

def _open(name: str) -> StateDir:
    sd = StateDir(name)
    if not sd.exists():
        raise ClusterError(f"no cluster {name} (in {clusters_dir()})")
    return sd


def _view(sd: StateDir) -> dict:
    """status.json (or what a starting agent has not written yet) and
    agent_alive."""
    alive = sd.agent_alive()
    st = sd.read_status() or {"name": sd.name, "state": "starting", "nodes": [],
                              "cpu_ms": 0, "cost_milli": 0, "pid": sd.agent_pid()}
    return dict(st, agent_alive=alive)


def _status(args) -> int:
    if args.name:
        views = [_view(_open(args.name))]
    else:
        views = []
        for sd in StateDir.all():
            try:
                views.append(_view(sd))
            except ClusterError as e:  # (one unreadable cluster hides no other)
                _err(e.message)
    if args.json:
        print(json.dumps(views[0] if args.name else views, indent=1))
    elif not views:
        print(f"no clusters (in {clusters_dir()})")
    for i, v in enumerate([] if args.json else views):
        if i:
            print()
        _table(v)
    return 0


def _cluster_state(v: dict) -> str:
    if v["state"] in FINAL_STATES:
        return v["state"] + (f": {v['error']}" if v.get("error") else "")
    if not v["agent_alive"]:
        return (f"{v['state']}, but its agent (pid {v.get('pid') or '?'}) is gone: its nodes "
                f"may still run on the market")
    return f"{v['state']}, agent pid {v.get('pid') or '?'}"


def _table(v: dict) -> None:
    print(f"cluster {v['name']}: {_cluster_state(v)}")
    if v.get("image"):
        print(f"  image {v['image'][:16]} ({v.get('iso')}), order {v.get('order')}")
    for line in summary_lines(v):
        print(line)
    if v.get("network"):
        for line in network_lines(v["network"]):
            print(line)


# --- console -------------------------------------------------------------------

def _send_input(sd: StateDir, node: str) -> None:
    """Each line of stdin to the node's console (a thread)."""
    import base64
    stdin = sys.stdin.buffer
    while True:
        try:
            line = stdin.readline()
        except (OSError, ValueError):
            return
        if not line:
            return
        try:
            req = {"command": "input", "node": node, "input": line.decode()}
        except UnicodeDecodeError:
            req = {"command": "input", "node": node,
                   "input_base64": base64.b64encode(line).decode()}
        try:
            answer = sd.request(req, 30)
        except ClusterError as e:
            _err(e.message)
            return
        if "error" in answer:
            _err(f"{node}: {answer['error']}")


def _console(args) -> int:
    sd = _open(args.name)
    view = _view(sd)
    names = [n["node"] for n in view["nodes"]]
    if args.node not in names:
        raise ClusterError(f"no node {args.node} in cluster {sd.name}"
                           + (f" ({', '.join(names)})" if names else " (it has no nodes yet)"))
    until = args.until.encode() if args.until else None
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    follow = ConsoleReader(sd, args.node)
    feeder = None
    if view["agent_alive"] and view["state"] not in FINAL_STATES:
        feeder = threading.Thread(target=_send_input, args=(sd, args.node), daemon=True)
        feeder.start()
    out = sys.stdout.buffer
    tail = b""  # the end of what was printed, to find TEXT across reads

    def seen(data: bytes) -> bool:
        nonlocal tail
        out.write(data)
        out.flush()
        if until is None:
            return False
        both = tail + data
        tail = both[len(both) - len(until) + 1:] if len(until) > 1 else b""
        return until in both

    while True:
        data = follow.read()
        if data:
            if seen(data):
                if feeder is not None and not sys.stdin.isatty():
                    feeder.join(2)  # (what was read from stdin has gone)
                return 0
            continue
        node = next((n for n in (sd.read_status() or {"nodes": []})["nodes"]
                     if n["node"] == args.node), None)
        ended = node is not None and node["state"] in END_STATES
        if ended or not sd.agent_alive():
            if seen(follow.read()):
                return 0
            if ended:
                print(f"cpushare cluster: {args.node} {node['state']}"
                      + (f": {node['message']}" if node.get("message") else ""),
                      file=sys.stderr)
                return 0 if until is None else 1
            _err(f"the agent of cluster {sd.name} is gone")
            return 1
        if deadline is not None and time.monotonic() > deadline:
            _err(f"{args.node}: " + (f"{args.until!r} not printed" if until is not None
                                     else "still running") + f" after {args.timeout:g} s")
            return 1
        time.sleep(0.1)


# --- down ----------------------------------------------------------------------

def _down(args) -> int:
    sd = _open(args.name)
    view = _view(sd)
    if not view["agent_alive"]:
        if view["state"] in FINAL_STATES:
            print(f"cluster {sd.name} is down already ({view['state']})")
            for text in summary_lines(view):
                print(text)
            return 0
        raise ClusterError(f"cluster {sd.name}: its agent (pid {view.get('pid') or '?'}) is "
                           f"gone; its nodes may still run on the market until their "
                           f"lease's CPU time is spent")
    try:
        answer = sd.request({"command": "down"}, args.timeout)
    except ClusterError:
        answer = {}  # (an agent that was ending closed its socket: it says below)
        if sd.agent_alive() and (sd.read_status() or {}).get("state") not in FINAL_STATES:
            raise
    if "error" in answer:
        raise ClusterError(f"cluster {sd.name}: {answer['error']}")
    deadline = time.monotonic() + 10
    while sd.agent_alive():
        if time.monotonic() > deadline:
            raise ClusterError(f"cluster {sd.name}: its agent (pid {view.get('pid')}) "
                               f"did not exit")
        time.sleep(0.05)
    st = answer.get("status")
    if not isinstance(st, dict):
        st = sd.read_status() or view
    for text in summary_lines(st):
        print(text)
    if any(n["state"] not in END_STATES for n in st["nodes"]):
        _err(f"cluster {sd.name}: not every node ended"
             + (f": {st['error']}" if st.get("error") else ""))
        return 1
    return 0
