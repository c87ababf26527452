"""`cpushare-server`: run the CPUShare market and administer it.

    cpushare-server [--db PATH] init [--listen HOST:PORT] [--name NAME]
    cpushare-server [--db PATH] serve [--listen HOST:PORT] [--heartbeat S]
    cpushare-server [--db PATH] account add NAME [--coins N]
    cpushare-server [--db PATH] account mint NAME --coins N
    cpushare-server [--db PATH] account list
    cpushare-server [--db PATH] sell-order add ACCOUNT --price P [--model M] ... --output FILE.cpu
    cpushare-server [--db PATH] buy-order add ACCOUNT --price P [--redundancy K]
                                          [--max-cpu-seconds S] --output FILE.buy
    cpushare-server [--db PATH] balance ACCOUNT
    cpushare-server [--db PATH] ledger check
    cpushare-server [--db PATH] cert list | cert revoke FINGERPRINT

See cpushare-server(8).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys

from .. import __version__
from .. import order as orders
from . import admin
from .ca import DEFAULT_CERT_DAYS

PROG = "cpushare-server"


def _arg(parse, what: str):
    def conv(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{what}: {e}") from None
    conv.__name__ = what
    return conv


COINS = _arg(orders.parse_price, "CPUCoins")
SIZE = _arg(orders.parse_size, "size")
HOSTPORT = _arg(orders.split_hostport, "HOST:PORT")


def build_parser() -> argparse.ArgumentParser:
    opt = admin.option_type  # (the order files' ranges; out of range: exit 2)
    p = argparse.ArgumentParser(prog=PROG, description="The CPUShare market server and its "
                                "administration (see cpushare-server(8)).")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--db", default=os.environ.get("CPUSHARE_SERVER_DB", admin.DEFAULT_DB),
                   help=f"the market database: a SQLite file, or postgresql://... (default: "
                        f"$CPUSHARE_SERVER_DB or {admin.DEFAULT_DB})")
    p.add_argument("--images", metavar="DIR",
                   help="with a postgresql:// database: the directory of this machine for "
                        "chunked images (ISOs); given at init, kept in the database")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    s = sub.add_parser("init", help="create the database, the market CA and server certificate")
    s.add_argument("--listen", default=admin.DEFAULT_LISTEN, type=str,
                   help=f"address to serve on (default {admin.DEFAULT_LISTEN})")
    s.add_argument("--name", help="the name sellers and buyers connect to, written into "
                   "order files and the server certificate (default: the listen host, or "
                   "this machine's FQDN when listening on every address)")

    s = sub.add_parser("serve", help="run the market until SIGTERM or SIGINT")
    s.add_argument("--listen", help="override the address given at init")
    s.add_argument("--heartbeat", type=int, default=15, help="seconds between pings (15)")
    s.add_argument("--max-wait", type=float, default=0, metavar="SECONDS",
                   help="fail, and refund, a task no seller has taken for this long "
                        "(default 0: it waits for ever)")
    s.add_argument("--synchronous", choices=("full", "normal"),
                   help="SQLite durability of each group commit (default normal)")
    s.add_argument("--link", metavar="HOST[:PORT]",
                   help="with a postgresql:// database: where this process listens for "
                        "links from the market's other processes, an address they reach "
                        "(default 127.0.0.1 and a free port of 20000-29999: the processes of "
                        "this machine)")
    s.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))

    s = sub.add_parser("migrate", help="move a SQLite market into an empty PostgreSQL "
                       "database (stop its server first)")
    s.add_argument("--from", dest="src", required=True, metavar="PATH",
                   help="the SQLite market database")
    s.add_argument("--to", dest="dst", required=True, metavar="postgresql://...",
                   help="an empty PostgreSQL database (with --images DIR)")

    acc = sub.add_parser("account", help="accounts").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True)
    s = acc.add_parser("add", help="create an account, optionally minting coins for it")
    s.add_argument("name")
    s.add_argument("--coins", type=COINS, default=0, help="CPUCoins to mint (e.g. 1000 or 0.5)")
    s = acc.add_parser("mint", help="mint CPUCoins for an existing account")
    s.add_argument("name")
    s.add_argument("--coins", type=COINS, required=True)
    acc.add_parser("list", help="accounts and balances")

    for kind in ("sell", "buy"):
        grp = sub.add_parser(f"{kind}-order", help=f"{kind} orders").add_subparsers(
            dest="sub", metavar="SUBCOMMAND", required=True)
        s = grp.add_parser("add", help=f"issue a {kind} order and write its file")
        s.add_argument("account")
        s.add_argument("--price", type=COINS, required=True,
                       help=("ask" if kind == "sell" else "bid") + ", CPUCoins per CPU-hour")
        s.add_argument("--model", choices=("seccomp", "kvm"), default="seccomp",
                       help="the computation model: seccomp bytecode, or kvm (a bootable "
                            "ISO under qemu)")
        if kind == "sell":
            s.add_argument("--cpu-seconds", type=opt("--cpu-seconds"), default=3600,
                           help="per task (3600)")
            s.add_argument("--wall-seconds", type=opt("--wall-seconds"), default=7200,
                           help="per task (7200)")
            s.add_argument("--memory", type=opt("--memory"), default=256 << 20,
                           help="per task (256M)")
            s.add_argument("--output-limit", type=opt("--output-limit"), default=64 << 20,
                           help="output bytes per task (64M)")
            s.add_argument("--allow-cpuid", action="store_true",
                           help="let jobs run CPUID (by default it faults where the CPU "
                                "can make it)")
            s.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None,
                           help="kvm: the accelerator (auto measures KVM, else TCG)")
            s.add_argument("--cpus", type=opt("--cpus"), default=None,
                           help="kvm: vCPUs of each guest (1)")
            s.add_argument("--cache", type=opt("--cache"), default=None,
                           help="kvm: bytes of ISOs the seller keeps (20G)")
        else:
            s.add_argument("--redundancy", type=opt("--redundancy"), default=1,
                           help="sellers of different accounts that must agree (1)")
            s.add_argument("--max-cpu-seconds", type=opt("--max-cpu-seconds"), default=60,
                           help="per task, or per node of a kvm lease (60)")
            s.add_argument("--memory", type=opt("--memory"), default=None,
                           help="kvm: RAM per node (1G)")
            s.add_argument("--max-nodes", type=opt("--max-nodes"), default=None,
                           help="kvm: nodes at once (16)")
            s.add_argument("--accel", choices=("any", "kvm"), default=None,
                           help="kvm: any, or only sellers whose KVM works")
            s.add_argument("--boot-seconds", type=opt("--boot-seconds"), default=None,
                           help="kvm: a node silent on its console this long did not boot "
                                "(300)")
        s.add_argument("--days", type=opt("--days"), default=DEFAULT_CERT_DAYS,
                       help=f"validity of the order's certificate ({DEFAULT_CERT_DAYS})")
        s.add_argument("--output", required=True, metavar="FILE",
                       help="the order file to write (mode 0600)")

    s = sub.add_parser("balance", help="print an account's balance in CPUCoins")
    s.add_argument("account")

    led = sub.add_parser("ledger", help="the ledger").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True)
    led.add_parser("check", help="verify every invariant; exit 0 only if all hold")

    crt = sub.add_parser("cert", help="issued certificates").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True)
    crt.add_parser("list", help="every issued certificate")
    s = crt.add_parser("revoke", help="refuse a certificate from now on")
    s.add_argument("fingerprint", help="SHA-256 fingerprint (hex, or a unique prefix)")
    return p


def cmd_init(args) -> int:
    store = admin.init(args.db, args.listen, args.name, images=args.images)
    print(f"initialised {store.path}")
    store.close()
    return 0


def raise_nofile() -> tuple[int, int]:
    """Every seller and buyer is one descriptor: the soft limit on them (1,024
    in most shells, which the market's epoll loop has no need of) goes up to
    the hard one (systemd's LimitNOFILE= sets both).  The limits after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        want = hard
        if hard == resource.RLIM_INFINITY:  # (the kernel caps it at fs.nr_open)
            try:
                with open("/proc/sys/fs/nr_open") as f:
                    want = int(f.read())
            except (OSError, ValueError):
                want = 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def cmd_serve(args) -> int:
    from ..daemon import stderr_is_journal
    from .server import Market  # the admin commands need no asyncio server
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=("" if stderr_is_journal() else "%(asctime)s ")
                        + "%(name)s %(levelname)s: %(message)s")
    nofile, _ = raise_nofile()
    if nofile < 4096:
        logging.getLogger("cpushare.market").info(
            "at most %d open descriptors (RLIMIT_NOFILE): about as many sellers and buyers "
            "at once; raise the hard limit (LimitNOFILE=, ulimit -Hn) for more", nofile)
    if not args.max_wait >= 0:
        print(f"{PROG}: --max-wait {args.max_wait:g}: must be 0 (never) or a number of "
              f"seconds", file=sys.stderr)
        return 2
    if args.link is not None and not admin.is_url(args.db):
        print(f"{PROG}: --link is for several processes on a postgresql:// database; "
              f"{args.db} is served by one", file=sys.stderr)
        return 2
    try:
        link = orders.split_hostport(args.link or "127.0.0.1", default_port=0)
        if link[0] in ("0.0.0.0", "::"):
            raise ValueError("the other processes connect to it: name one address of "
                             "this machine they reach")
    except ValueError as e:
        print(f"{PROG}: --link {args.link}: {e}", file=sys.stderr)
        return 2
    sync = args.synchronous or (None if admin.is_url(args.db) else "normal")  # (the default)
    store = admin.open_store(args.db, sync, args.images)
    if not store.shared:
        try:
            store.lock_serving()
        except admin.StoreError as e:
            store.close()
            raise admin.AdminError(str(e)) from None
    store.checkpoint_in_background()
    host, port = orders.split_hostport(args.listen or store.get_meta("listen"))
    ctx = admin.tls_context(store)
    market = Market(store, heartbeat=args.heartbeat, max_wait=args.max_wait, link=link)
    try:
        asyncio.run(_serve(market, host, port, ctx))
    except _ListenError as e:
        raise admin.AdminError(f"cannot listen on {orders.join_hostport(host, port)}: "
                               f"{e.error.strerror or e.error}") from None
    finally:
        store.close()
    return 0


class _ListenError(Exception):
    """The market could not start listening (`error` is the OSError)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


async def _serve(market, host: str, port: int, ctx) -> None:
    """Run `market` until SIGTERM or SIGINT, telling systemd (sd_notify(3),
    when $NOTIFY_SOCKET is set) READY=1 once it listens, WATCHDOG=1 from this
    loop while it turns (when $WATCHDOG_USEC is set), and STOPPING=1."""
    from ..daemon import notify, watchdog_interval

    loop = asyncio.get_running_loop()

    def stop(signame: str) -> None:
        notify(STOPPING=1, STATUS=f"Stopping ({signame})")
        market.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    started: asyncio.Future[int] = loop.create_future()
    serving = asyncio.create_task(market.serve(host, port, ctx, started))
    await asyncio.wait((started, serving), return_when=asyncio.FIRST_COMPLETED)
    if not started.done():  # it ended before it listened
        try:
            await serving
        except OSError as e:
            raise _ListenError(e) from None
        return
    where = orders.join_hostport(host, started.result())
    notify(READY=1, MAINPID=os.getpid(), STATUS=f"Serving the market on {where}")
    interval = watchdog_interval()
    watchdog = asyncio.create_task(_watchdog(interval)) if interval else None
    try:
        await serving
    finally:
        if watchdog is not None:
            watchdog.cancel()
        notify(STOPPING=1)


async def _watchdog(interval: float) -> None:
    """WATCHDOG=1 every `interval` seconds, from the event loop: a loop that
    stops turning stops the pings, and systemd restarts the market."""
    from ..daemon import notify

    while True:
        notify(WATCHDOG=1)
        await asyncio.sleep(interval)


def cmd_account(args) -> int:
    if args.sub == "add":
        store = admin.open_store(args.db, images=args.images)
        admin.add_account(store, args.name, args.coins)
        print(f"{args.name} {orders.format_coins(store.account(args.name).balance_milli)}")
    elif args.sub == "mint":
        store = admin.open_store(args.db, images=args.images)
        with store.transaction():
            admin.mint(store, args.name, args.coins)
        print(f"{args.name} {orders.format_coins(store.account(args.name).balance_milli)}")
    else:
        store = admin.open_store(args.db, images=args.images)
        for a in store.accounts():
            print(f"{a.name} {orders.format_coins(a.balance_milli)}")
    return 0


def cmd_order(args) -> int:
    store = admin.open_store(args.db, images=args.images)
    if args.cmd == "sell-order":
        oid = admin.add_sell_order(
            store, args.account, args.price, args.output, model=args.model,
            cpu_seconds=args.cpu_seconds, wall_seconds=args.wall_seconds, memory=args.memory,
            output=args.output_limit, allow_cpuid=args.allow_cpuid, accel=args.accel,
            cpus=args.cpus, cache=args.cache, days=args.days)
    else:
        oid = admin.add_buy_order(
            store, args.account, args.price, args.output, redundancy=args.redundancy,
            max_cpu_seconds=args.max_cpu_seconds, model=args.model, memory=args.memory,
            max_nodes=args.max_nodes, accel=args.accel, boot_seconds=args.boot_seconds,
            days=args.days)
    print(f"{args.cmd} {oid} for {args.account} written to {args.output}")
    return 0


def cmd_migrate(args) -> int:
    from .migrate import migrate
    from .store.pg import is_url
    if not is_url(args.dst):
        raise admin.AdminError(f"--to {args.dst}: a postgresql:// URL")
    s = migrate(args.src, args.dst, args.images)
    print(f"moved: ledger ok on both, {s['transactions']} transactions, {s['accounts']} "
          f"accounts, minted {orders.format_coins(s['minted'])}, in escrow "
          f"{orders.format_coins(s['escrow'])}")
    return 0


def cmd_balance(args) -> int:
    store = admin.open_store(args.db, images=args.images)
    acct = admin._account(store, args.account)
    print(f"{acct.name} {orders.format_coins(acct.balance_milli)}")
    return 0


def cmd_ledger(args) -> int:
    store = admin.open_store(args.db, images=args.images)
    problems = store.check()
    if problems:
        for p in problems:
            print(f"ledger: {p}")
        print(f"ledger check FAILED: {len(problems)} problem(s)")
        return 1
    s = store.ledger_summary()
    print(f"ledger ok: {s['transactions']} transactions, {s['accounts']} accounts, "
          f"minted {orders.format_coins(s['minted'])}, "
          f"in escrow {orders.format_coins(s['escrow'])}")
    return 0


def cmd_cert(args) -> int:
    store = admin.open_store(args.db, images=args.images)
    import time
    if args.sub == "list":
        for c in store.certs():
            state = "revoked" if c.revoked else ("expired" if c.not_after < time.time()
                                                 else "valid")
            print(f"{c.fingerprint} {c.account} {c.role} {c.order_id} {state}")
        return 0
    matches = [c for c in store.certs() if c.fingerprint.startswith(args.fingerprint.lower())]
    if len(matches) != 1:
        raise admin.AdminError(f"fingerprint {args.fingerprint!r} matches {len(matches)} "
                               f"certificates, not one")
    with store.transaction():
        store.revoke(matches[0].fingerprint)
    print(f"revoked {matches[0].fingerprint} ({matches[0].account} {matches[0].role} "
          f"{matches[0].order_id})")
    return 0


COMMANDS = {"init": cmd_init, "serve": cmd_serve, "account": cmd_account,
            "sell-order": cmd_order, "buy-order": cmd_order, "balance": cmd_balance,
            "ledger": cmd_ledger, "cert": cmd_cert, "migrate": cmd_migrate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except (admin.AdminError, orders.OrderError) as e:
        print(f"{PROG}: {args.cmd}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: {args.cmd}: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
