"""The agent of ``cpushare cluster up``: the process that holds a cluster.

It keeps one Market connection and the nodes of `Market.cluster`, writes
the cluster's state directory (clusterstate) on every change, appends each
node's console to its file, and serves the control socket (`down`, console
input).  SIGINT, SIGTERM and SIGHUP power every node off (Cluster.down),
settle, and end it; so does a `down` request.

In the foreground (``up`` without --detach) it runs in the command's own
process.  Detached, ``up`` starts ``python -m cpushare.buyer.clusteragent``
in a session of its own: it inherits the locked pid file and a pipe on
which it reports (JSON lines) each node's changes until every node runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from contextlib import suppress
from pathlib import Path

from ..order import BuyOrder, OrderError, load_buy
from . import Market, MarketError
from .cluster import END_STATES, Cluster, Node
from .clusternet import ClusterNet, NetError
from .clusternetargs import NetSpec, add_net_arguments, net_spec
from .clusterreport import PipeReport, Report
from .clusterstate import (MAX_INPUT, MAX_REQUEST, ClusterError, ConsoleLog, StateDir,
                           count_nodes, market_status, socket_path, summary_lines)

log = logging.getLogger("cpushare.cluster")

DOWN_TIMEOUT = 180.0  # seconds the nodes have to end once told to
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DESCRIBE = {"waiting": "no seller has taken it yet", "image": "its seller receives the ISO",
            "booting": "started, nothing on its console yet", "paused": "paused by its seller"}


# --- the agent -------------------------------------------------------------------

class _Stopped(Exception):
    pass


def node_line(node: str, state: str, seller: str | None, message: str | None) -> str:
    return f"{node}  {state}  {seller or '-'}" + (f"  {message}" if message else
                                                   f"  ({DESCRIBE[state]})" if state in DESCRIBE
                                                   else "")


class Agent:
    """Holds one cluster until it is brought down or every node ended."""

    def __init__(self, sd: StateDir, order: BuyOrder, iso: Path, nodes: int,
                 cpu_ms: int | None, timeout: float | None, report: Report,
                 net: NetSpec | None = None):
        self.sd = sd
        self.netspec = net
        self.net: ClusterNet | None = None
        self.order = order
        self.iso = iso
        self.n = nodes
        self.cpu_ms = cpu_ms
        self.timeout = timeout
        self.report = report
        self.state = "starting"
        self.digest: str | None = None
        self.error: str | None = None
        self.cluster: Cluster | None = None
        self.market: Market | None = None
        self.started = time.time()
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._finished = asyncio.Event()
        self._signal: int | None = None
        self._shown: dict[str, tuple] = {}  # node -> what its last line said
        self._written: dict | None = None
        self._answers: set[asyncio.Task] = set()  # `down` requests waiting for the end
        self._clients: set[asyncio.StreamWriter] = set()

    # --- status ---------------------------------------------------------------

    def status(self) -> dict:
        nodes = [] if self.cluster is None else [
            {k: n.as_dict()[k] for k in ("node", "seller", "state", "cpu_ms", "cost_milli",
                                         "message")} for n in self.cluster.nodes]
        return {"name": self.sd.name, "state": self.state,
                "order": os.path.abspath(self.order.path),
                "server": self.order.server, "iso": str(self.iso), "image": self.digest,
                "nodes_wanted": self.n, "pid": os.getpid(), "started": self.started,
                "error": self.error, "nodes": nodes,
                "network": None if self.net is None or self.net.tap is None
                else self.net.status(),
                "cpu_ms": sum(n["cpu_ms"] for n in nodes),
                "cost_milli": sum(n["cost_milli"] for n in nodes)}

    def _save(self) -> None:
        """Write status.json if anything changed (and show each node's change)."""
        if self.cluster is not None:
            for n in self.cluster.nodes:
                self._show(n.name, n.state, n.seller, n.message)
        status = self.status()
        if status != self._written:
            try:
                self.sd.write_status(dict(status, updated=time.time()))
                self._written = status
            except OSError as e:
                log.error("%s: %s", self.sd.status_path, e.strerror)

    def _show(self, node: str, state: str, seller: str | None, message: str | None) -> None:
        if self._shown.get(node) != (state, message):
            self._shown[node] = (state, message)
            self.report.line(node_line(node, state, seller, message))

    def _set(self, state: str) -> None:
        self.state = state
        self._save()

    # --- running -------------------------------------------------------------

    def _on_signal(self, sig: int) -> None:
        if self._signal is None:
            self._signal = sig
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()

    async def _unless_stopped(self, coro):
        """`coro`'s result, or _Stopped (it is cancelled) when a stop comes first."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await task
        raise _Stopped

    async def run(self, lock_fd: int) -> int:
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._save()
        try:
            with socket_path(self.sd.control_path) as where:
                server = await asyncio.start_unix_server(self._serve, where, limit=MAX_REQUEST)
            os.chmod(self.sd.control_path, 0o600)
        except OSError as e:
            self.report.error(f"{self.sd.control_path}: cannot serve the control socket: "
                              f"{e.strerror}")
            self._set("failed")
            self.report.done(1)
            return 1
        try:
            status = await self._hold()
        finally:
            self._save()
            self._finished.set()
            if self._answers:  # (a `down` waiting for its answer)
                await asyncio.wait(self._answers, timeout=5)
            server.close()
            for w in list(self._clients):
                w.close()
            self.sd.control_path.unlink(missing_ok=True)
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
        if self._signal is not None and status == 0:
            status = 128 + self._signal
        self.report.done(status)
        return status

    def _fail(self, text: str, status: int) -> int:
        self.error = text
        self.report.error(text)
        self._set("failed")
        return status

    async def _hold(self) -> int:
        o = self.order
        m = self.market = Market(o)
        if self.netspec is not None:
            ns = self.netspec
            self.net = ClusterNet(self.sd.path, ns.listen, ns.subnet, ns.dhcp, ns.nfs)
            try:
                self.net.open()
            except NetError as e:
                return self._fail(str(e), 1)
            self.report.line(f"{self.sd.name}: network {ns.subnet} on {self.net.tap} (this "
                             f"host {ns.subnet.address}), link endpoint udp "
                             f"{ns.listen[0]}:{ns.listen[1]}, told to sellers as {ns.advertise}")
        try:
            try:
                await self._unless_stopped(m.connect())
                self._set("image")
                size = self.iso.stat().st_size
                self.report.line(f"{self.sd.name}: sending {self.iso} ({size} bytes) to "
                                 f"{o.server} (only what it does not hold)")
                self.digest = await self._unless_stopped(m.upload_iso(self.iso))
                self._set("leasing")
                # not cancelled by a stop: the leases it opens must be powered off
                self.cluster = await m.cluster(
                    self.iso, self.n, name=self.sd.name, cpu_ms=self.cpu_ms,
                    link=None if self.netspec is None else self.netspec.advertise,
                    on_link=None if self.net is None else self._on_link)
            except _Stopped:
                self.error = "stopped before the nodes were leased"
                self.report.error(self.error)
                self._set("ended")
                return 1 if self._signal is None and self.report.waiting else 0
            except MarketError as e:
                if e.code == "image":
                    return self._fail(f"{self.iso}: the market refused the ISO: {e.message}", 2)
                return self._fail(e.message if e.message.startswith(o.server)
                                  else f"{o.server}: {e}", market_status(e))
            except OSError as e:
                return self._fail(f"{self.iso}: {e.strerror}", 2)
            self.state = "up"
            self.report.line(f"{self.sd.name}: {count_nodes(self.n)} leased (image "
                             f"{self.digest[:16]})")
            try:
                return await self._follow(self.cluster)
            except BaseException:  # (a bug: still power the nodes off)
                if not self.cluster.all_ended():
                    with suppress(Exception):
                        await self.cluster.down(30)
                raise
        finally:
            await m.close()
            if self.net is not None:
                self.net.close()

    def _on_link(self, node: Node) -> None:
        link_id, tx, rx = node.link
        self.net.add_node(node.name, link_id, tx, rx)
        self._changed.set()

    def _net_tick(self) -> None:
        net = self.net
        if net is None or net.tap is None:
            return
        for n in self.cluster.nodes if self.cluster is not None else ():
            if n.state in END_STATES:
                net.node_ended(n.name, f"{n.state}: {n.reason or n.message or 'its lease ended'}")
        net.tick()
        while net.events:
            self.report.line(f"{self.sd.name}: {net.events.pop(0)}")

    async def _follow(self, c: Cluster) -> int:
        consoles = [asyncio.create_task(self._console(n)) for n in c.nodes]
        helpers = [asyncio.create_task(self._events(c)), asyncio.create_task(self._tick())]
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        status = 0
        ready = False
        try:
            while not self._stop.is_set() and not c.all_ended():
                if not ready and c.all_running():
                    ready = True
                    self._save()
                    self.report.ready(
                        f"{self.sd.name}: every node runs ({self.n}); agent pid {os.getpid()}")
                elif not ready:
                    gone = next((n for n in c.nodes if n.state in END_STATES), None)
                    if gone is not None:
                        status = self._fail(f"{gone.name} {gone.state} before every node "
                                            f"ran: {gone.reason or gone.message}", 1)
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        waiting = ", ".join(f"{n.name} {n.state}" for n in c.nodes
                                            if n.state != "running")
                        status = self._fail(f"not every node runs after {self.timeout:g} s "
                                            f"({waiting})", 1)
                        break
                self._changed.clear()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1)
                self._save()
        finally:
            helpers[0].cancel()  # (down() reads the events from here on)
        if not ready and status == 0 and self._signal is None and self.report.waiting:
            self.error = "brought down (cpushare cluster down) before every node ran"
            self.report.error(self.error)
            status = 1
        if not c.all_ended() and not self.market.connected:
            # (the SDK connects again by itself, or says the nodes are lost)
            self.report.line(f"{self.sd.name}: waiting for the connection to "
                             f"{self.order.server} to power the nodes off")
            deadline = time.monotonic() + Market.RECONNECT_FOR + 10
            while (not c.all_ended() and not self.market.connected
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.2)
        if not c.all_ended() and not self.market.connected:
            status = self._fail(f"cannot power the nodes off: not connected to "
                                f"{self.order.server}; they run until their lease's CPU time "
                                f"is spent", 1)
        elif not c.all_ended():
            if self.state != "failed":
                self.state = "ending"
            self._save()
            left = sum(n.state not in END_STATES for n in c.nodes)
            why = "" if self._signal is None else f" ({signal.Signals(self._signal).name})"
            self.report.line(f"{self.sd.name}: powering {count_nodes(left)} off{why}")
            try:
                await c.down(DOWN_TIMEOUT)
            except TimeoutError:
                status = self._fail("not every node ended within "
                                    f"{DOWN_TIMEOUT:g} s of being powered off: "
                                    + ", ".join(f"{n.name} {n.state}" for n in c.nodes
                                                if n.state not in END_STATES), 1)
        with suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*consoles, return_exceptions=True), 5)
        for t in helpers:
            t.cancel()
        self._net_tick()  # (the ports of the nodes that ended are freed, and said so)
        if self.state != "failed":
            self.state = "ended"
            if status == 0 and any(n.state == "lost" for n in c.nodes):
                status = 1
        self._save()
        for text in summary_lines(self.status()):
            self.report.line(text)
        return status

    async def _events(self, c: Cluster) -> None:
        async for ev in c.events():
            self._show(ev.node.name, ev.state, ev.node.seller, ev.message)
            self._changed.set()

    async def _tick(self) -> None:
        """Every second: status.json (CPU time and cost change without an
        event), and the connection's changes."""
        m = self.market
        connected = True
        while True:
            await asyncio.sleep(1)
            self._net_tick()
            self._save()
            if m.connected != connected:
                connected = m.connected
                self.report.line(f"{self.sd.name}: " + (
                    f"connected to {self.order.server} again" if connected else
                    f"lost the connection to {self.order.server}; connecting again"))

    async def _console(self, node: Node) -> None:
        try:
            out = ConsoleLog(self.sd, node.name)
        except OSError as e:
            log.error("%s console: %s", node.name, e.strerror)
            return
        try:
            while data := await node.read_console():
                try:
                    out.append(data)
                except OSError as e:
                    log.error("%s console: %s", node.name, e.strerror)
        finally:
            out.close()

    # --- the control socket ---------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            sock = writer.get_extra_info("socket")
            _, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid != os.getuid():
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(_answer(error=f"a request is one JSON line of at most "
                                                f"{MAX_REQUEST} bytes"))
                    break
                if not line:
                    break
                writer.write(_answer(**await self._answer(line)))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _answer(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):
            return {"error": "a request is a JSON object on one line"}
        if not isinstance(req, dict) or not isinstance(req.get("command"), str):
            return {"error": 'a request is a JSON object with a "command": "down" or "input"'}
        cmd = req["command"]
        if cmd == "down":
            task = asyncio.current_task()
            self._answers.add(task)
            try:
                self.stop()
                await self._finished.wait()
            finally:
                self._answers.discard(task)
            return {"ok": True, "status": self.status()}
        if cmd == "input":
            return await self._input(req)
        return {"error": f"unknown command {cmd[:40]!r}: down or input"}

    async def _input(self, req: dict) -> dict:
        c = self.cluster
        name = req.get("node")
        if c is None:
            return {"error": f"cluster {self.sd.name} has no nodes yet ({self.state})"}
        node = next((n for n in c.nodes if n.name == name), None)
        if node is None:
            return {"error": f"no node {str(name)[:40]!r} in cluster {self.sd.name} "
                             f"(node0 to node{len(c.nodes) - 1})"}
        text, b64 = req.get("input"), req.get("input_base64")
        if (text is None) == (b64 is None) or not isinstance(text if b64 is None else b64, str):
            return {"error": 'console input is a string in "input" (text) or '
                             '"input_base64" (bytes)'}
        try:
            data = text.encode() if b64 is None else base64.b64decode(b64, validate=True)
        except (UnicodeEncodeError, binascii.Error) as e:
            return {"error": f"console input: {e}"}
        if len(data) > MAX_INPUT:
            return {"error": f"console input of {len(data)} bytes: at most {MAX_INPUT} at once"}
        if node.state in END_STATES:
            return {"error": f"{node.name} " + ("was lost" if node.state == "lost" else
                                                "has ended")}
        try:
            await node.write_console(data)
        except MarketError as e:
            return {"error": e.message}
        except (ConnectionError, OSError):
            return {"error": f"not connected to {self.order.server} (connecting again)"}
        return {"ok": True}


def _answer(**fields) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def run_agent(sd: StateDir, lock_fd: int, order: BuyOrder, iso: Path, nodes: int,
              cpu_ms: int | None, timeout: float | None, report: Report,
              net: NetSpec | None = None) -> int:
    agent = Agent(sd, order, iso, nodes, cpu_ms, timeout, report, net)
    return asyncio.run(agent.run(lock_fd))


def main(argv: list[str] | None = None) -> int:
    """The detached agent (started by `cpushare cluster up --detach`)."""
    p = argparse.ArgumentParser(prog="python -m cpushare.buyer.clusteragent",
                                description="The agent of a detached cpushare cluster.")
    p.add_argument("--name", required=True)
    p.add_argument("--order", required=True, type=Path)
    p.add_argument("--iso", required=True, type=Path)
    p.add_argument("--nodes", required=True, type=int)
    p.add_argument("--cpu-ms", type=int)
    p.add_argument("--timeout", type=float)
    p.add_argument("--lock-fd", required=True, type=int)
    p.add_argument("--report-fd", required=True, type=int)
    add_net_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s: %(message)s")
    report = PipeReport(args.report_fd)
    try:
        sd = StateDir(args.name)
        order = load_buy(args.order)
        net = net_spec(args, args.nodes)
    except (ClusterError, OrderError, ValueError) as e:
        report.error(str(e))
        report.done(2)
        return 2
    os.set_inheritable(args.lock_fd, False)
    return run_agent(sd, args.lock_fd, order, args.iso, args.nodes, args.cpu_ms, args.timeout,
                     report, net)


if __name__ == "__main__":
    sys.exit(main())
