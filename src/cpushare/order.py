"""Order files: `.cpu` sell orders and `.buy` buyer credentials.

Both are configobj files checked against a configspec (SELL_SPEC,
BUY_SPEC); see cpushare.cpu(5).  Every error is an OrderError whose text
names the file, the line and the key, e.g.

    /etc/cpushare/cpu0.cpu:7: price: 'abc' is not a number of CPUCoins

Prices are decimal CPUCoins in the file and integer milli-CPUCoins in
memory; sizes take K, M, G suffixes (powers of 1024).  The ranges of the
numbers (RANGES) are the configspecs' and the command lines' alike: what a
command accepts, the loader accepts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from configobj import ConfigObj, ConfigObjError, flatten_errors, get_extra_values
from validate import ValidateError, Validator, VdtMissingValue

from .fileutil import atomic_write
from .protocol import MAX_BYTES

MILLI = 1000
MAX_PRICE_MILLI = 10**15  # a bound far above any sane price, below int64 trouble
DEFAULT_PORT = 7300
MAX_SECONDS = 365 * 86400  # a year: CPU and wall-clock limits
MAX_REDUNDANCY = 16


@dataclass(frozen=True)
class Range:
    """An inclusive range of integers; `size` ones read and print as sizes."""
    low: int
    high: int
    size: bool = False

    def __contains__(self, value: int) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        fmt = format_size if self.size else str
        return f"{fmt(self.low)}..{fmt(self.high)}"

    def spec(self) -> str:
        """Its configspec arguments."""
        return f"min={self.low}, max={self.high}"


# Every number of an order file: the configspecs below are built from these,
# and so are the range checks of the commands that write the files.
RANGES = {
    "cpu_seconds": Range(1, MAX_SECONDS),
    "wall_seconds": Range(1, MAX_SECONDS),
    "memory": Range(4096, MAX_BYTES, size=True),
    "output": Range(0, MAX_BYTES, size=True),
    "redundancy": Range(1, MAX_REDUNDANCY),
    "max_cpu_seconds": Range(1, MAX_SECONDS),
    "cpus": Range(1, 64),
    "cache": Range(0, MAX_BYTES, size=True),
    "max_nodes": Range(1, 4096),
    "boot_seconds": Range(1, 86400),
}
# Keys that only a kvm order may set (a seccomp order saying one is refused:
# it would be accepted and do nothing).
KVM_SELL_KEYS = ("accel", "cache", "limits.cpus")
KVM_BUY_KEYS = ("accel", "memory", "max_nodes", "boot_seconds")


class OrderError(ValueError):
    """An order file is unusable; the text says which file, line and key."""


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int
    wall_seconds: int
    memory: int  # bytes
    output: int  # bytes
    allow_cpuid: bool = False  # else CPUID faults, where the CPU can make it
    cpus: int = 1  # a kvm guest's vCPUs


@dataclass(frozen=True)
class SellOrder:
    name: str  # the file's stem: cpu0 for /etc/cpushare/cpu0.cpu
    path: str
    host: str
    port: int
    model: str  # 'seccomp' | 'kvm'
    price_milli: int  # ask, milli-CPUCoins per CPU-hour
    ca_pem: str
    cert_pem: str
    key_pem: str
    limits: Limits
    accel: str = "auto"  # kvm: auto | kvm | tcg
    cache: int = 20 << 30  # kvm: bytes of ISOs the seller keeps

    @property
    def server(self) -> str:
        return join_hostport(self.host, self.port)


@dataclass(frozen=True)
class BuyOrder:
    name: str
    path: str
    host: str
    port: int
    price_milli: int  # bid, milli-CPUCoins per CPU-hour
    redundancy: int
    max_cpu_seconds: int
    ca_pem: str
    cert_pem: str
    key_pem: str
    model: str = "seccomp"  # the computation model of its work
    memory: int = 1 << 30  # kvm: RAM per node
    max_nodes: int = 16  # kvm: nodes at once
    accel: str = "any"  # kvm: any | kvm (TCG is much slower for the same CPU time)
    boot_seconds: int = 300  # kvm: a node silent on its console this long has not booted

    @property
    def server(self) -> str:
        return join_hostport(self.host, self.port)


# --- values -----------------------------------------------------------------

_PRICE = re.compile(r"\d+(\.\d{1,3})?|\.\d{1,3}")


def parse_price(text: str) -> int:
    """"0.010" CPUCoins -> 10 milli-CPUCoins, exactly (no float anywhere)."""
    t = str(text).strip()
    if t.startswith("-"):
        raise ValueError(f"{text!r} is negative")
    if not _PRICE.fullmatch(t):
        if re.fullmatch(r"\d*\.\d{4,}", t):
            raise ValueError(f"{text!r} has more than 3 decimals (the unit is 0.001 CPUCoin)")
        raise ValueError(f"{text!r} is not a number of CPUCoins (like 0.010)")
    whole, _, frac = t.partition(".")
    milli = int(whole or "0") * MILLI + int((frac + "000")[:3])
    if milli > MAX_PRICE_MILLI:
        raise ValueError(f"{text!r} is too large")
    return milli


def format_coins(milli: int) -> str:
    """10 -> '0.010'; -1500 -> '-1.500'."""
    sign = "-" if milli < 0 else ""
    whole, frac = divmod(abs(milli), MILLI)
    return f"{sign}{whole}.{frac:03d}"


_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, *, largest: int | None = MAX_BYTES) -> int:
    """"256M" -> 268435456; suffixes K, M, G, T are powers of 1024.  No
    size is more than MAX_BYTES (1T), the most the protocol carries (unless
    the caller checks a range of its own: largest=None)."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (like 1048576, 64K, 256M, 1G)")
    n = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if largest is not None and n > largest:
        raise ValueError(f"{text!r} is more than the largest size, {format_size(largest)}")
    return n


def format_size(n: int) -> str:
    """268435456 -> '256M': the largest unit that divides n exactly."""
    for suffix in ("T", "G", "M", "K"):
        unit = _SIZE_UNITS[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def split_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'host:port', '[v6]:port' or 'host' -> (host, port)."""
    t = str(text).strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not HOST:PORT")
        port_s = rest[1:] if rest else ""
    elif t.count(":") == 1:
        host, port_s = t.split(":")
    elif ":" in t:
        raise ValueError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
    else:
        host, port_s = t, ""
    if not host or not re.fullmatch(r"[A-Za-z0-9._:-]+", host):
        raise ValueError(f"{text!r} has no valid host name")
    if port_s == "":
        return host, default_port
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"{text!r}: port {port_s!r} is not 1..65535")
    return host, int(port_s)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_cert(text: str) -> str:
    from cryptography import x509
    try:
        x509.load_pem_x509_certificate(text.strip().encode())
    except ValueError as e:
        raise ValueError(f"is not a PEM certificate ({e})") from None
    return text.strip() + "\n"


def _check_key(text: str) -> str:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    try:
        load_pem_private_key(text.strip().encode(), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"is not an unencrypted PEM private key ({e})") from None
    return text.strip() + "\n"


# --- configspecs ------------------------------------------------------------

_CREDENTIALS_SPEC = """
[credentials]
ca = pem_cert()
certificate = pem_cert()
key = pem_key()
"""

_R = RANGES
SELL_SPEC = f"""
server = hostport()
model = option('seccomp', 'kvm', default='seccomp')
price = price()
accel = option('auto', 'kvm', 'tcg', default='auto')
cache = size({_R["cache"].spec()}, default=20G)
[limits]
cpu_seconds = integer({_R["cpu_seconds"].spec()}, default=3600)
wall_seconds = integer({_R["wall_seconds"].spec()}, default=7200)
memory = size({_R["memory"].spec()}, default=256M)
output = size({_R["output"].spec()}, default=64M)
allow_cpuid = boolean(default=False)
cpus = integer({_R["cpus"].spec()}, default=1)
""" + _CREDENTIALS_SPEC

BUY_SPEC = f"""
server = hostport()
model = option('seccomp', 'kvm', default='seccomp')
price = price()
redundancy = integer({_R["redundancy"].spec()}, default=1)
max_cpu_seconds = integer({_R["max_cpu_seconds"].spec()}, default=60)
memory = size({_R["memory"].spec()}, default=1G)
max_nodes = integer({_R["max_nodes"].spec()}, default=16)
accel = option('any', 'kvm', default='any')
boot_seconds = integer({_R["boot_seconds"].spec()}, default=300)
""" + _CREDENTIALS_SPEC


def _check_written(host: str, port: int, price_milli: int) -> None:
    split_hostport(join_hostport(host, port))
    if not (isinstance(price_milli, int) and 0 <= price_milli <= MAX_PRICE_MILLI):
        raise ValueError(f"price = {price_milli} milli-CPUCoins is outside "
                         f"0..{format_coins(MAX_PRICE_MILLI)} CPUCoins")


def check_range(key: str, value: int) -> int:
    """`value` for order key `key` (a key of RANGES), or ValueError saying
    the range."""
    r = RANGES[key]
    if not (isinstance(value, int) and value in r):
        shown = format_size(value) if r.size and isinstance(value, int) and value >= 0 else value
        raise ValueError(f"{key} = {shown} is outside {r}")
    return value


class _Bad(ValidateError):
    pass


def _wrap(fn):
    def check(value, *args, **kw):
        if isinstance(value, list):
            raise _Bad(f"{value!r} is a list (quote a value that holds commas)")
        try:
            out = fn(value)
        except ValueError as e:
            raise _Bad(str(e)) from None
        if "min" in kw and out < parse_size(kw["min"]):
            raise _Bad(f"{value!r} is below the minimum {format_size(parse_size(kw['min']))}")
        if "max" in kw and out > parse_size(kw["max"]):
            raise _Bad(f"{value!r} is above the maximum {format_size(parse_size(kw['max']))}")
        return out
    return check


_VALIDATOR = Validator({
    "price": _wrap(parse_price),
    "size": _wrap(parse_size),
    "hostport": _wrap(split_hostport),
    "pem_cert": _wrap(_check_cert),
    "pem_key": _wrap(_check_key),
})


def _key_line(lines: list[str], section: tuple[str, ...], key: str | None) -> int:
    """Best-effort line number (1-based) of `key` in `section`; 0 if absent."""
    current: tuple[str, ...] = ()
    section_line = 0
    for n, raw in enumerate(lines, 1):
        s = raw.strip()
        m = re.fullmatch(r"(\[+)\s*([^\]]+?)\s*\]+\s*(#.*)?", s)
        if m:
            depth = len(m.group(1))
            current = current[:depth - 1] + (m.group(2),)
            if current == section:
                section_line = n
            continue
        if current == section and key is not None and re.match(
                rf"['\"]?{re.escape(key)}['\"]?\s*=", s):
            return n
    return section_line


def _load(path: str | os.PathLike, spec: str, kind: str) -> tuple[ConfigObj, list[str]]:
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise OrderError(f"{path}: cannot read {kind}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise OrderError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.splitlines()
    try:
        conf = ConfigObj(lines, configspec=spec.splitlines(), file_error=True,
                         interpolation=False, list_values=True, raise_errors=True)
    except ConfigObjError as e:
        line = getattr(e, "line_number", None) or 0
        msg = str(e).split(" at line ")[0].rstrip(".")
        raise OrderError(f"{path}:{line}: {msg}") from None
    errors: list[str] = []
    result = conf.validate(_VALIDATOR, preserve_errors=True)
    if result is not True:
        for sections, key, err in flatten_errors(conf, result):
            where = ".".join([*sections, key]) if key else ".".join(sections)
            line = _key_line(lines, tuple(sections), key)
            if err is False or isinstance(err, VdtMissingValue):
                what = "missing" if key else "section missing"
                errors.append(f"{path}:{line or len(lines)}: {where}: {what}")
            else:
                errors.append(f"{path}:{line}: {where}: {err}")
    for sections, key in get_extra_values(conf):
        where = ".".join([*sections, key])
        line = _key_line(lines, tuple(sections), key) or _key_line(lines, (*sections, key), None)
        errors.append(f"{path}:{line}: {where}: unknown key")
    if errors:
        raise OrderError("\n".join(errors))
    return conf, lines


def _check_pair(path: str, lines: list[str], creds) -> None:
    """The key must belong to the certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    cert = x509.load_pem_x509_certificate(creds["certificate"].encode())
    key = load_pem_private_key(creds["key"].encode(), password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, pub) != key.public_key().public_bytes(enc, pub):
        line = _key_line(lines, ("credentials",), "key")
        raise OrderError(f"{path}:{line}: credentials.key: does not belong to "
                         f"credentials.certificate")


def _kvm_only(path, lines, conf, keys) -> None:
    """A seccomp order may not set a key of the kvm model."""
    if conf["model"] == "kvm":
        return
    for dotted in keys:
        *sections, key = dotted.split(".")
        sec = conf
        for name in sections:
            sec = sec[name]
        if key not in sec.defaults:
            line = _key_line(lines, tuple(sections), key)
            raise OrderError(f"{path}:{line}: {dotted}: only an order of model = kvm may set it "
                             f"(this one is model = {conf['model']})")


def load_sell(path: str | os.PathLike) -> SellOrder:
    conf, lines = _load(path, SELL_SPEC, "sell order")
    _check_pair(str(path), lines, conf["credentials"])
    _kvm_only(path, lines, conf, KVM_SELL_KEYS)
    lim = conf["limits"]
    host, port = conf["server"]
    return SellOrder(
        name=Path(path).stem, path=str(path), host=host, port=port, model=conf["model"],
        price_milli=conf["price"], ca_pem=conf["credentials"]["ca"],
        cert_pem=conf["credentials"]["certificate"], key_pem=conf["credentials"]["key"],
        limits=Limits(cpu_seconds=lim["cpu_seconds"], wall_seconds=lim["wall_seconds"],
                      memory=lim["memory"], output=lim["output"],
                      allow_cpuid=lim["allow_cpuid"], cpus=lim["cpus"]),
        accel=conf["accel"], cache=conf["cache"])


def load_buy(path: str | os.PathLike) -> BuyOrder:
    conf, lines = _load(path, BUY_SPEC, "buy order")
    _check_pair(str(path), lines, conf["credentials"])
    _kvm_only(path, lines, conf, KVM_BUY_KEYS)
    host, port = conf["server"]
    return BuyOrder(
        name=Path(path).stem, path=str(path), host=host, port=port,
        price_milli=conf["price"], redundancy=conf["redundancy"],
        max_cpu_seconds=conf["max_cpu_seconds"], ca_pem=conf["credentials"]["ca"],
        cert_pem=conf["credentials"]["certificate"], key_pem=conf["credentials"]["key"],
        model=conf["model"], memory=conf["memory"], max_nodes=conf["max_nodes"],
        accel=conf["accel"], boot_seconds=conf["boot_seconds"])


# --- writing ----------------------------------------------------------------

def _pem_block(name: str, pem: str) -> str:
    return f'{name} = """\n{pem.strip()}\n"""\n'


def _write_private(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically, mode 0600 from the first byte."""
    atomic_write(path, text.encode("utf-8"), mode=0o600)


def write_sell(path: str | os.PathLike, *, host: str, port: int, price_milli: int,
               ca_pem: str, cert_pem: str, key_pem: str, model: str = "seccomp",
               cpu_seconds: int = 3600, wall_seconds: int = 7200,
               memory: int = 256 << 20, output: int = 64 << 20, allow_cpuid: bool = False,
               accel: str = "auto", cpus: int = 1, cache: int = 20 << 30,
               comment: str = "") -> None:
    """Write a sell order; ValueError (and no file) for a value out of RANGES."""
    for key, value in (("cpu_seconds", cpu_seconds), ("wall_seconds", wall_seconds),
                       ("memory", memory), ("output", output), ("cpus", cpus),
                       ("cache", cache)):
        check_range(key, value)
    if model not in ("seccomp", "kvm"):
        raise ValueError(f"model {model!r}: must be seccomp or kvm")
    if accel not in ("auto", "kvm", "tcg"):
        raise ValueError(f"accel {accel!r}: must be auto, kvm or tcg")
    kvm = ""
    if model == "kvm":
        kvm = (f"accel = {accel}             # auto measures KVM and falls back to TCG\n"
               f"cache = {format_size(cache)}            # ISOs kept, least recently used go\n")
    elif (accel, cpus, cache) != ("auto", 1, 20 << 30):
        raise ValueError("accel, cpus and cache are settings of model kvm only")
    _check_written(host, port, price_milli)
    head = f"# {comment}\n" if comment else ""
    text = (
        f"# CPUShare sell order: one CPU sold to the market, see cpushare.cpu(5).\n{head}"
        f"server = {join_hostport(host, port)}\n"
        f"model = {model}\n"
        f"price = {format_coins(price_milli)}          # ask, CPUCoins per CPU-hour\n"
        + kvm +
        f"\n[limits]                 # per task\n"
        f"cpu_seconds = {cpu_seconds}\n"
        f"wall_seconds = {wall_seconds}\n"
        f"memory = {format_size(memory)}\n"
        f"output = {format_size(output)}\n"
        f"allow_cpuid = {'true' if allow_cpuid else 'false'}"
        "      # else CPUID faults, where the CPU can\n"
        + (f"cpus = {cpus}                # vCPUs of a guest\n" if model == "kvm" else "")
        + f"\n[credentials]            # secret: keep this file mode 0600\n"
        + _pem_block("ca", ca_pem) + _pem_block("certificate", cert_pem)
        + _pem_block("key", key_pem))
    _write_private(path, text)


def write_buy(path: str | os.PathLike, *, host: str, port: int, price_milli: int,
              ca_pem: str, cert_pem: str, key_pem: str, redundancy: int = 1,
              max_cpu_seconds: int = 60, model: str = "seccomp", memory: int = 1 << 30,
              max_nodes: int = 16, accel: str = "any", boot_seconds: int = 300,
              comment: str = "") -> None:
    """Write a buy order; ValueError (and no file) for a value out of RANGES."""
    if model not in ("seccomp", "kvm"):
        raise ValueError(f"model {model!r}: must be seccomp or kvm")
    if accel not in ("any", "kvm"):
        raise ValueError(f"accel {accel!r}: must be any or kvm")
    for key, value in (("memory", memory), ("max_nodes", max_nodes),
                       ("boot_seconds", boot_seconds)):
        check_range(key, value)
    kvm = ""
    if model == "kvm":
        kvm = (f"memory = {format_size(memory)}           # RAM per node\n"
               f"max_nodes = {max_nodes}\n"
               f"accel = {accel}              # kvm: only sellers whose KVM works\n"
               f"boot_seconds = {boot_seconds}       # a node silent this long did not boot\n")
    elif (memory, max_nodes, accel, boot_seconds) != (1 << 30, 16, "any", 300):
        raise ValueError("memory, max_nodes, accel and boot_seconds are settings of "
                         "model kvm only")
    check_range("redundancy", redundancy)
    check_range("max_cpu_seconds", max_cpu_seconds)
    _check_written(host, port, price_milli)
    head = f"# {comment}\n" if comment else ""
    text = (
        f"# CPUShare buyer credentials and buy order, see cpushare.cpu(5).\n{head}"
        f"server = {join_hostport(host, port)}\n"
        f"model = {model}\n"
        f"price = {format_coins(price_milli)}          # bid, CPUCoins per CPU-hour\n"
        f"redundancy = {redundancy}\n"
        f"max_cpu_seconds = {max_cpu_seconds}\n"
        + kvm
        + f"\n[credentials]            # secret: keep this file mode 0600\n"
        + _pem_block("ca", ca_pem) + _pem_block("certificate", cert_pem)
        + _pem_block("key", key_pem))
    _write_private(path, text)
