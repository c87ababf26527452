"""What the admin commands do, as functions (the CLI and the tests call them)."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import ssl

from .. import order as orders
from ..protocol import server_context
from . import ca
from .store import SQLiteStore, Store, StoreError

DEFAULT_DB = "/var/lib/cpushare-server/market.db"
DEFAULT_LISTEN = "127.0.0.1:7300"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_WILDCARDS = {"0.0.0.0", "::", ""}


class AdminError(Exception):
    """An admin command that cannot be done; the text says why."""


def init(db: str, listen: str = DEFAULT_LISTEN, name: str | None = None,
         ca_days: int = ca.DEFAULT_CA_DAYS) -> SQLiteStore:
    """Create the store, the market's CA and its server certificate."""
    try:
        host, port = orders.split_hostport(listen)
    except ValueError as e:
        raise AdminError(f"--listen: {e}") from None
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


def open_store(db: str, synchronous: str = "full") -> SQLiteStore:
    try:
        store = SQLiteStore(db, synchronous=synchronous)
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
    if days < 1:
        raise AdminError(f"--days must be at least 1, not {days}")
    return ca.issue(store.get_meta("ca_cert"), store.get_meta("ca_key"), cn, days=days,
                    not_before=not_before)


def _public(store: Store) -> tuple[str, int]:
    return orders.split_hostport(store.get_meta("public") or store.get_meta("listen"))


def add_sell_order(store: Store, account: str, price_milli: int, path: str, *,
                   model: str = "seccomp", cpu_seconds: int = 3600, wall_seconds: int = 7200,
                   memory: int = 256 << 20, output: int = 64 << 20,
                   days: int = ca.DEFAULT_CERT_DAYS,
                   not_before: dt.datetime | None = None) -> int:
    """A sell order with its own client certificate, written whole to `path`."""
    if model not in ("seccomp", "kvm"):
        raise AdminError(f"--model must be seccomp or kvm, not {model!r}")
    for what, v in (("--cpu-seconds", cpu_seconds), ("--wall-seconds", wall_seconds)):
        if v < 1:
            raise AdminError(f"{what} must be at least 1, not {v}")
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
                          comment=f"account {account}, sell order {oid}, certificate "
                                  f"valid until {cert.not_after[:10]}")
    return oid


def add_buy_order(store: Store, account: str, price_milli: int, path: str, *,
                  redundancy: int = 1, max_cpu_seconds: int = 60,
                  days: int = ca.DEFAULT_CERT_DAYS,
                  not_before: dt.datetime | None = None) -> int:
    if not 1 <= redundancy <= 16:
        raise AdminError(f"--redundancy must be 1..16, not {redundancy}")
    if max_cpu_seconds < 1:
        raise AdminError(f"--max-cpu-seconds must be at least 1, not {max_cpu_seconds}")
    acct = _account(store, account)
    host, port = _public(store)
    with store.transaction():
        oid = store.add_buy_order(acct.id, price_milli, redundancy, max_cpu_seconds)
        cert = _issue(store, f"{account} buy order {oid}", days, not_before)
        store.add_cert(cert.fingerprint, acct.id, "buyer", oid,
                       dt.datetime.fromisoformat(cert.not_after).timestamp(),
                       f"{account} buy order {oid}")
        orders.write_buy(path, host=host, port=port, price_milli=price_milli,
                         ca_pem=store.get_meta("ca_cert"), cert_pem=cert.cert_pem,
                         key_pem=cert.key_pem, redundancy=redundancy,
                         max_cpu_seconds=max_cpu_seconds,
                         comment=f"account {account}, buy order {oid}, certificate "
                                 f"valid until {cert.not_after[:10]}")
    return oid
