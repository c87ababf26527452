"""What the admin commands do, as functions (the CLI and the tests call them).

Every number they take is checked against one range (OPTIONS): the order
files' own (cpushare.order.RANGES) for what goes into an order file, so no
command writes a file the loader refuses.  `option_type` gives the same
check to argparse, where a value out of range is a usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import socket
import ssl

from .. import order as orders
from ..protocol import server_context
from . import ca
from .store import SQLiteStore, Store, StoreError
from .store.pg import is_url

DEFAULT_DB = "/var/lib/cpushare-server/market.db"
DEFAULT_LISTEN = "127.0.0.1:7300"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_WILDCARDS = {"0.0.0.0", "::", ""}


class AdminError(Exception):
    """An admin command that cannot be done; the text says why."""


MAX_DAYS = 36500  # certificates: at most a hundred years

# The numeric options of the admin commands: how each reads and its range.
OPTIONS: dict[str, orders.Range] = {
    "--cpu-seconds": orders.RANGES["cpu_seconds"],
    "--wall-seconds": orders.RANGES["wall_seconds"],
    "--memory": orders.RANGES["memory"],
    "--output-limit": orders.RANGES["output"],
    "--redundancy": orders.RANGES["redundancy"],
    "--max-cpu-seconds": orders.RANGES["max_cpu_seconds"],
    "--cpus": orders.RANGES["cpus"],
    "--cache": orders.RANGES["cache"],
    "--max-nodes": orders.RANGES["max_nodes"],
    "--boot-seconds": orders.RANGES["boot_seconds"],
    "--days": orders.Range(1, MAX_DAYS),
}


def _shown(r: orders.Range, value) -> str:
    if r.size and isinstance(value, int) and value >= 0:
        return orders.format_size(value)
    return str(value)


def check_option(option: str, value) -> int:
    """`value` of `option` (a key of OPTIONS), or AdminError naming both and the range."""
    r = OPTIONS[option]
    if not (isinstance(value, int) and not isinstance(value, bool) and value in r):
        raise AdminError(f"{option} must be {r}, not {_shown(r, value)}")
    return value


def option_type(option: str):
    """An argparse `type` for `option`: the value read (a size for sizes,
    else an integer) and checked against its range, or a usage error that
    says the range."""
    r = OPTIONS[option]

    def convert(text: str) -> int:
        try:
            value = orders.parse_size(text, largest=None) if r.size else int(text, 10)
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"{e}" if r.size else f"{text!r} is not an integer") from None
        if value not in r:
            raise argparse.ArgumentTypeError(f"must be {r}, not {text}")
        return value
    convert.__name__ = option.lstrip("-")
    return convert


def _check_price(price_milli: int) -> None:
    if not 0 <= price_milli <= orders.MAX_PRICE_MILLI:
        raise AdminError(f"--price must be 0..{orders.format_coins(orders.MAX_PRICE_MILLI)}, "
                         f"not {orders.format_coins(price_milli)}")


def init(db: str, listen: str = DEFAULT_LISTEN, name: str | None = None,
         ca_days: int = ca.DEFAULT_CA_DAYS, images: str | None = None) -> Store:
    """Create the store, the market's CA and its server certificate."""
    if not 1 <= ca_days <= MAX_DAYS:
        raise AdminError(f"the CA's validity must be 1..{MAX_DAYS} days, not {ca_days}")
    try:
        host, port = orders.split_hostport(listen)
    except ValueError as e:
        raise AdminError(f"--listen: {e}") from None
    if is_url(db):
        return _init_pg(db, host, port, name, ca_days, images)
    if images is not None:
        raise AdminError("--images: a SQLite market keeps its images beside its file "
                         f"({db}.images); --images is for a postgresql:// database")
    if os.path.exists(db):
        raise AdminError(f"{db}: exists already; the market there keeps its CA and ledger "
                         f"(remove the file to start a new market)")
    public = name or (socket.getfqdn() if host in _WILDCARDS else host)
    directory = os.path.dirname(os.path.abspath(db))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    old = os.umask(0o077)  # the store holds the CA key
    try:
        store = SQLiteStore(db, create=True)
        try:
            _init_ca(store, host, port, public, ca_days)
        except BaseException:
            store.close()
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.unlink(db + suffix)
            raise
    finally:
        os.umask(old)
    return store


def _init_ca(store: SQLiteStore, host: str, port: int, public: str, ca_days: int) -> None:
    authority = ca.make_ca(days=ca_days)
    names = [public] + ([host] if host not in _WILDCARDS and host != public else [])
    if host in _WILDCARDS:
        names += [n for n in ("localhost", "127.0.0.1", "::1") if n != public]
    server = ca.issue(authority.cert_pem, authority.key_pem, public, server_names=names,
                      days=ca_days)
    with store.transaction():
        for k, v in (("ca_cert", authority.cert_pem), ("ca_key", authority.key_pem),
                     ("server_cert", server.cert_pem), ("server_key", server.key_pem),
                     ("listen", orders.join_hostport(host, port)),
                     ("public", orders.join_hostport(public, port))):
            store.set_meta(k, v)


def create_pg(url: str, images: str | None) -> tuple[Store, str]:
    """The PostgreSQL store at `url`, its tables created, and the absolute
    directory of its chunked images (made if need be)."""
    from .store.pg import PostgresStore
    if not images:
        raise AdminError("--images DIR: a market on PostgreSQL keeps chunked images (ISOs) "
                         "in a directory of this machine: give one")
    images = os.path.abspath(images)
    os.makedirs(images, mode=0o700, exist_ok=True)
    try:
        return PostgresStore(url, image_dir=images, create=True), images
    except StoreError as e:
        raise AdminError(str(e)) from None


def _init_pg(url: str, host: str, port: int, name: str | None, ca_days: int,
             images: str | None) -> Store:
    store, images = create_pg(url, images)
    if store.get_meta("ca_cert") is not None:
        store.close()
        raise AdminError(f"{store.path}: holds a market already; it keeps its CA and ledger")
    public = name or (socket.getfqdn() if host in _WILDCARDS else host)
    try:
        with store.transaction():
            store.set_meta("image_dir", images)
        _init_ca(store, host, port, public, ca_days)
    except BaseException:
        store.close()
        raise
    return store


def open_store(db: str, synchronous: str | None = None, images: str | None = None) -> Store:
    if is_url(db):
        from .store.pg import PostgresStore
        if synchronous is not None:
            raise AdminError("--synchronous is SQLite's; PostgreSQL's durability is its own "
                             "synchronous_commit setting")
        try:
            store = PostgresStore(db, image_dir=images)
        except StoreError as e:
            raise AdminError(str(e)) from None
        if store.get_meta("ca_cert") is None:
            store.close()
            raise AdminError(f"{store.path}: has no market CA (run init)")
        return store
    if images is not None:
        raise AdminError("--images is for a postgresql:// database")
    try:
        store = SQLiteStore(db, synchronous=synchronous or "full")
    except StoreError as e:
        raise AdminError(str(e)) from None
    if store.get_meta("ca_cert") is None:
        raise AdminError(f"{db}: has no market CA (run init)")
    return store


def tls_context(store: Store) -> ssl.SSLContext:
    return server_context(store.get_meta("ca_cert"), store.get_meta("server_cert"),
                          store.get_meta("server_key"))


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise AdminError(f"account name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
                         f"starting with a letter or digit")
    return name


def mint(store: Store, name: str, milli: int) -> None:
    """Create `milli` CPUCoins out of nothing for account `name`.  In a transaction."""
    acct = _account(store, name)
    if milli <= 0:
        raise AdminError(f"--coins must be more than 0, not {orders.format_coins(milli)}")
    if milli > orders.MAX_PRICE_MILLI:
        raise AdminError(f"--coins must be at most {orders.format_coins(orders.MAX_PRICE_MILLI)}, "
                         f"not {orders.format_coins(milli)}")
    store.transfer("mint", [(store.mint_id, -milli), (acct.id, milli)],
                   memo=f"minted for {name}")


def add_account(store: Store, name: str, coins_milli: int = 0) -> int:
    check_name(name)
    with store.transaction():
        try:
            aid = store.add_account(name)
        except StoreError as e:
            raise AdminError(str(e)) from None
        if coins_milli:
            mint(store, name, coins_milli)
    return aid


def _account(store: Store, name: str):
    acct = store.account(name)
    if acct is None or name.startswith("@"):
        raise AdminError(f"no account {name!r} (see 'cpushare-server account list')")
    return acct


def _issue(store: Store, cn: str, days: int, not_before: dt.datetime | None) -> ca.Issued:
    return ca.issue(store.get_meta("ca_cert"), store.get_meta("ca_key"), cn, days=days,
                    not_before=not_before)


def _public(store: Store) -> tuple[str, int]:
    return orders.split_hostport(store.get_meta("public") or store.get_meta("listen"))


def _kvm_only(model: str, *given: tuple[str, object]) -> None:
    """Options of the kvm model: refused for another (they would do nothing)."""
    if model != "kvm":
        for option, value in given:
            if value is not None:
                raise AdminError(f"{option} is an option of --model kvm only")


def add_sell_order(store: Store, account: str, price_milli: int, path: str, *,
                   model: str = "seccomp", cpu_seconds: int = 3600, wall_seconds: int = 7200,
                   memory: int = 256 << 20, output: int = 64 << 20,
                   allow_cpuid: bool = False, accel: str | None = None, cpus: int | None = None,
                   cache: int | None = None, days: int = ca.DEFAULT_CERT_DAYS,
                   not_before: dt.datetime | None = None) -> int:
    """A sell order with its own client certificate, written whole to `path`.
    `accel`, `cpus` and `cache` (None: their defaults) are for model kvm only."""
    if model not in ("seccomp", "kvm"):
        raise AdminError(f"--model must be seccomp or kvm, not {model!r}")
    _kvm_only(model, ("--accel", accel), ("--cpus", cpus), ("--cache", cache))
    accel, cpus, cache = accel or "auto", cpus or 1, 20 << 30 if cache is None else cache
    if accel not in ("auto", "kvm", "tcg"):
        raise AdminError(f"--accel must be auto, kvm or tcg, not {accel!r}")
    _check_price(price_milli)
    for option, value in (("--cpu-seconds", cpu_seconds), ("--wall-seconds", wall_seconds),
                          ("--memory", memory), ("--output-limit", output), ("--days", days),
                          ("--cpus", cpus), ("--cache", cache)):
        check_option(option, value)
    acct = _account(store, account)
    host, port = _public(store)
    with store.transaction():
        oid = store.add_sell_order(acct.id, price_milli, model, cpu_seconds, wall_seconds,
                                   memory, output)
        cert = _issue(store, f"{account} sell order {oid}", days, not_before)
        store.add_cert(cert.fingerprint, acct.id, "seller", oid,
                       dt.datetime.fromisoformat(cert.not_after).timestamp(),
                       f"{account} sell order {oid}")
        orders.write_sell(path, host=host, port=port, price_milli=price_milli,
                          ca_pem=store.get_meta("ca_cert"), cert_pem=cert.cert_pem,
                          key_pem=cert.key_pem, model=model, cpu_seconds=cpu_seconds,
                          wall_seconds=wall_seconds, memory=memory, output=output,
                          allow_cpuid=allow_cpuid, accel=accel, cpus=cpus, cache=cache,
                          comment=f"account {account}, sell order {oid}, certificate "
                                  f"valid until {cert.not_after[:10]}")
    return oid


def add_buy_order(store: Store, account: str, price_milli: int, path: str, *,
                  redundancy: int = 1, max_cpu_seconds: int = 60, model: str = "seccomp",
                  memory: int | None = None, max_nodes: int | None = None,
                  accel: str | None = None, boot_seconds: int | None = None,
                  days: int = ca.DEFAULT_CERT_DAYS,
                  not_before: dt.datetime | None = None) -> int:
    """A buy order with its own client certificate, written whole to `path`.
    `memory`, `max_nodes`, `accel` and `boot_seconds` (None: their defaults)
    are for model kvm only."""
    _check_price(price_milli)
    if model not in ("seccomp", "kvm"):
        raise AdminError(f"--model must be seccomp or kvm, not {model!r}")
    _kvm_only(model, ("--memory", memory), ("--max-nodes", max_nodes), ("--accel", accel),
              ("--boot-seconds", boot_seconds))
    memory = 1 << 30 if memory is None else memory
    max_nodes, accel, boot_seconds = max_nodes or 16, accel or "any", boot_seconds or 300
    if accel not in ("any", "kvm"):
        raise AdminError(f"--accel must be any or kvm, not {accel!r}")
    for option, value in (("--redundancy", redundancy), ("--max-cpu-seconds", max_cpu_seconds),
                          ("--days", days), ("--memory", memory), ("--max-nodes", max_nodes),
                          ("--boot-seconds", boot_seconds)):
        check_option(option, value)
    acct = _account(store, account)
    host, port = _public(store)
    with store.transaction():
        if model == "kvm":
            oid = store.add_buy_order(acct.id, price_milli, redundancy, max_cpu_seconds, model,
                                      memory, max_nodes, accel, boot_seconds)
        else:
            oid = store.add_buy_order(acct.id, price_milli, redundancy, max_cpu_seconds, model)
        cert = _issue(store, f"{account} buy order {oid}", days, not_before)
        store.add_cert(cert.fingerprint, acct.id, "buyer", oid,
                       dt.datetime.fromisoformat(cert.not_after).timestamp(),
                       f"{account} buy order {oid}")
        orders.write_buy(path, host=host, port=port, price_milli=price_milli,
                         ca_pem=store.get_meta("ca_cert"), cert_pem=cert.cert_pem,
                         key_pem=cert.key_pem, redundancy=redundancy,
                         max_cpu_seconds=max_cpu_seconds, model=model, memory=memory,
                         max_nodes=max_nodes, accel=accel, boot_seconds=boot_seconds,
                         comment=f"account {account}, buy order {oid}, certificate "
                                 f"valid until {cert.not_after[:10]}")
    return oid
