"""cpushare.order: .cpu and .buy files; every error names file, line and key."""

from __future__ import annotations

import os
import re
import stat

import pytest

from cpushare import order
from cpushare.market import ca
from cpushare.order import OrderError, parse_price, parse_size


@pytest.fixture(scope="module")
def pki():
    auth = ca.make_ca()
    return auth, ca.issue(auth.cert_pem, auth.key_pem, "o1"), ca.issue(auth.cert_pem,
                                                                          auth.key_pem, "o2")


def block(name, pem):
    return f'{name} = """\n{pem.strip()}\n"""\n'


def sell_text(pki, *, head="", limits="", creds=None):
    auth, leaf, _ = pki
    creds = creds if creds is not None else (
        block("ca", auth.cert_pem) + block("certificate", leaf.cert_pem)
        + block("key", leaf.key_pem))
    return (f"# a sell order\nserver = market.example.org:7300\nmodel = seccomp\n"
            f"price = 0.010\n{head}[limits]\ncpu_seconds = 60\n{limits}"
            f"[credentials]\n{creds}")


def write(tmp_path, text, name="cpu0.cpu"):
    p = tmp_path / name
    p.write_text(text)
    return p


# --- values -------------------------------------------------------------------

@pytest.mark.parametrize("text, milli", [
    ("0.010", 10), ("1", 1000), ("1.5", 1500), ("0", 0), (".5", 500), ("12.345", 12345),
    (" 2.25 ", 2250), ("1000000", 1_000_000_000),
])
def test_parse_price(text, milli):
    assert parse_price(text) == milli


@pytest.mark.parametrize("text, match", [
    ("abc", "not a number"), ("-1", "negative"), ("0.0001", "more than 3 decimals"),
    ("1e3", "not a number"), ("nan", "not a number"), ("inf", "not a number"),
    ("1,5", "not a number"), ("", "not a number"), ("1.", "not a number"),
    ("0x10", "not a number"), ("1" * 20, "too large"),
])
def test_parse_price_refuses(text, match):
    with pytest.raises(ValueError, match=match):
        parse_price(text)


@pytest.mark.parametrize("text, n", [
    ("1048576", 1 << 20), ("64K", 64 << 10), ("256M", 256 << 20), ("1G", 1 << 30),
    ("2g", 2 << 30), ("1T", 1 << 40), ("10MiB", 10 << 20), ("0", 0),
])
def test_parse_size(text, n):
    assert parse_size(text) == n
    assert parse_size(order.format_size(n)) == n


@pytest.mark.parametrize("text", ["", "-1", "1.5M", "M", "12Q", "1 0"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_coins():
    assert [order.format_coins(m) for m in (0, 5, 1000, 999950, -1500)] == [
        "0.000", "0.005", "1.000", "999.950", "-1.500"]


@pytest.mark.parametrize("text, hp", [
    ("h:1", ("h", 1)), ("h", ("h", 7300)), ("[::1]:80", ("::1", 80)), ("10.0.0.1:7300",
                                                                        ("10.0.0.1", 7300)),
])
def test_split_hostport(text, hp):
    assert order.split_hostport(text) == hp
    assert order.split_hostport(order.join_hostport(*hp)) == hp


@pytest.mark.parametrize("text", ["h:0", "h:65536", "h:x", "::1", ":80", "a b:1", "[::1"])
def test_split_hostport_refuses(text):
    with pytest.raises(ValueError):
        order.split_hostport(text)


# --- good files ------------------------------------------------------------------

def test_load_sell_with_defaults(tmp_path, pki):
    auth, leaf, _ = pki
    o = order.load_sell(write(tmp_path, sell_text(pki)))
    assert (o.name, o.host, o.port, o.model, o.price_milli) == (
        "cpu0", "market.example.org", 7300, "seccomp", 10)
    assert o.limits == order.Limits(cpu_seconds=60, wall_seconds=7200, memory=256 << 20,
                                    output=64 << 20)
    assert o.ca_pem.strip() == auth.cert_pem.strip() and o.key_pem.strip() == leaf.key_pem.strip()
    assert o.server == "market.example.org:7300"


def test_write_then_load_round_trip(tmp_path, pki):
    auth, leaf, _ = pki
    p = tmp_path / "x.cpu"
    order.write_sell(p, host="::1", port=7301, price_milli=1234, ca_pem=auth.cert_pem,
                     cert_pem=leaf.cert_pem, key_pem=leaf.key_pem, model="kvm",
                     cpu_seconds=5, wall_seconds=9, memory=3 << 20, output=100)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    o = order.load_sell(p)
    assert (o.host, o.port, o.model, o.price_milli) == ("::1", 7301, "kvm", 1234)
    assert o.limits == order.Limits(5, 9, 3 << 20, 100)
    b = tmp_path / "x.buy"
    order.write_buy(b, host="h", port=1, price_milli=50, ca_pem=auth.cert_pem,
                    cert_pem=leaf.cert_pem, key_pem=leaf.key_pem, redundancy=3,
                    max_cpu_seconds=7)
    assert stat.S_IMODE(os.stat(b).st_mode) == 0o600
    bo = order.load_buy(b)
    assert (bo.name, bo.price_milli, bo.redundancy, bo.max_cpu_seconds) == ("x", 50, 3, 7)
    assert not list(tmp_path.glob("*.tmp*"))


def test_example_order_in_etc_is_valid_but_for_its_placeholders():
    # the shipped example documents every key; its credentials are placeholders
    with pytest.raises(OrderError) as e:
        order.load_sell("etc/cpushare/example.cpu")
    msg = str(e.value)
    assert "credentials.ca" in msg and "unknown key" not in msg
    assert "price" not in msg and "limits" not in msg


# --- bad files: file:line: key: what ----------------------------------------------

def line_of(path, start: str) -> int:
    return next(n for n, x in enumerate(path.read_text().splitlines(), 1) if x.startswith(start))


@pytest.mark.parametrize("head, limits, key, expect", [
    ("", "memory = lots\n", "memory", "limits.memory: 'lots' is not a size"),
    ("", "", "cpu_seconds", None),
    ("", "wall_seconds = 1.5\n", "wall_seconds",
     "limits.wall_seconds: the value \"1.5\" is of the wrong type"),
    ("", "output = 1, 2\n", "output", "limits.output: ['1', '2'] is a list"),
    ("colour = red\n", "", "colour", "colour: unknown key"),
    ("", "speed = 3\n", "speed", "limits.speed: unknown key"),
])
def test_bad_values_name_file_line_and_key(tmp_path, pki, head, limits, key, expect):
    text = sell_text(pki, head=head, limits=limits)
    if expect is None:
        text = text.replace("cpu_seconds = 60", "cpu_seconds = 0")
        expect = "limits.cpu_seconds: the value \"0\" is too small"
    p = write(tmp_path, text)
    with pytest.raises(OrderError) as e:
        order.load_sell(p)
    assert str(e.value) == f"{p}:{line_of(p, key)}: {expect}" or \
        str(e.value).startswith(f"{p}:{line_of(p, key)}: {expect}"), str(e.value)


def test_bad_price_line(tmp_path, pki):
    text = sell_text(pki).replace("price = 0.010", "price = abc")
    p = write(tmp_path, text)
    with pytest.raises(OrderError, match=r"cpu0.cpu:4: price: 'abc' is not a number of CPUCoins"):
        order.load_sell(p)


@pytest.mark.parametrize("old, new, expect", [
    ("model = seccomp", "model = docker", "model: the value \"docker\" is unacceptable"),
    ("server = market.example.org:7300", "server = market:99999",
     "server: 'market:99999': port '99999' is not 1..65535"),
    ("price = 0.010", "price = -1", "price: '-1' is negative"),
    ("price = 0.010", "price = 0.0001", "price: '0.0001' has more than 3 decimals"),
])
def test_more_bad_values(tmp_path, pki, old, new, expect):
    p = write(tmp_path, sell_text(pki).replace(old, new))
    with pytest.raises(OrderError) as e:
        order.load_sell(p)
    assert str(e.value).startswith(f"{p}:{line_of(p, new)}: {expect}"), str(e.value)


def test_missing_keys_and_sections(tmp_path, pki):
    text = sell_text(pki).replace("price = 0.010\n", "").replace(
        "server = market.example.org:7300\n", "")
    p = write(tmp_path, text)
    with pytest.raises(OrderError) as e:
        order.load_sell(p)
    lines = str(e.value).splitlines()
    assert any("server: missing" in x for x in lines) and any("price: missing" in x for x in lines)
    p = write(tmp_path, sell_text(pki, creds="ca = x\n"), "nocreds.cpu")
    with pytest.raises(OrderError) as e:
        order.load_sell(p)
    assert "credentials.certificate: missing" in str(e.value)
    assert "credentials.key: missing" in str(e.value)


def test_bad_pem(tmp_path, pki):
    auth, leaf, _ = pki
    creds = (block("ca", auth.cert_pem) + block("certificate", "-----BEGIN CERTIFICATE-----\n"
             "bm90IGEgY2VydA==\n-----END CERTIFICATE-----") + block("key", "hello"))
    p = write(tmp_path, sell_text(pki, creds=creds))
    with pytest.raises(OrderError) as e:
        order.load_sell(p)
    msg = str(e.value)
    assert "credentials.certificate: is not a PEM certificate" in msg
    assert "credentials.key: is not an unencrypted PEM private key" in msg
    line = int(msg.split("credentials.certificate")[0].rsplit(":", 2)[-2])
    assert p.read_text().splitlines()[line - 1].startswith("certificate")


def test_key_of_another_certificate(tmp_path, pki):
    auth, leaf, other = pki
    creds = block("ca", auth.cert_pem) + block("certificate", leaf.cert_pem) + block(
        "key", other.key_pem)
    p = write(tmp_path, sell_text(pki, creds=creds))
    with pytest.raises(OrderError, match=r"credentials.key: does not belong to credentials"):
        order.load_sell(p)


def test_syntax_error_names_the_line(tmp_path, pki):
    p = write(tmp_path, "server = a:1\n[limits\nprice = 1\n")
    with pytest.raises(OrderError, match=r"cpu0.cpu:2: "):
        order.load_sell(p)


def test_unreadable_and_binary_files(tmp_path):
    with pytest.raises(OrderError, match=r"nope.cpu: cannot read sell order"):
        order.load_sell(tmp_path / "nope.cpu")
    p = tmp_path / "bin.cpu"
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(OrderError, match="not UTF-8"):
        order.load_sell(p)


def test_buy_order_values(tmp_path, pki):
    auth, leaf, _ = pki
    creds = block("ca", auth.cert_pem) + block("certificate", leaf.cert_pem) + block(
        "key", leaf.key_pem)
    p = write(tmp_path, f"server = m:1\nprice = 0.05\nredundancy = 17\n[credentials]\n{creds}",
              "b.buy")
    with pytest.raises(OrderError, match=r"b.buy:3: redundancy: the value \"17\" is too big"):
        order.load_buy(p)
    p.write_text(f"server = m:1\nprice = 0.05\n[credentials]\n{creds}")
    o = order.load_buy(p)
    assert (o.price_milli, o.redundancy, o.max_cpu_seconds) == (50, 1, 60)


# --- ranges: one source for the configspecs and the writers ------------------------

HUGE = 10**30
SELL_KEYS = ("cpu_seconds", "wall_seconds", "memory", "output")
BUY_KEYS = ("redundancy", "max_cpu_seconds")


def creds_of(pki):
    auth, leaf, _ = pki
    return block("ca", auth.cert_pem) + block("certificate", leaf.cert_pem) + block(
        "key", leaf.key_pem)


def load_with(tmp_path, pki, key, value):
    """Load a .cpu (a limit) or a .buy (a buy order key) with key = value."""
    if key in SELL_KEYS:
        text = sell_text(pki, limits=f"{key} = {value}\n")
        if key == "cpu_seconds":  # instead of sell_text's own
            text = text.replace("cpu_seconds = 60\n", "", 1)
        return order.load_sell(write(tmp_path, text))
    return order.load_buy(write(tmp_path, f"server = m:1\nprice = 0.05\n{key} = {value}\n"
                                          f"[credentials]\n{creds_of(pki)}", "b.buy"))


def loaded(o, key):
    return getattr(o.limits if key in SELL_KEYS else o, key)


@pytest.mark.parametrize("key", SELL_KEYS + BUY_KEYS)
def test_the_configspec_takes_exactly_the_range(tmp_path, pki, key):
    r = order.RANGES[key]
    for value in (r.low, r.high):
        assert loaded(load_with(tmp_path, pki, key, value), key) == value
    for value in (r.low - 1, r.high + 1, HUGE):
        if value < 0:
            continue
        with pytest.raises(OrderError, match=rf":\d+: (limits\.)?{key}: "):
            load_with(tmp_path, pki, key, value)


def test_sizes_stop_at_the_protocols_largest():
    assert parse_size("1T") == order.MAX_BYTES
    for text in ("1025G", "2T", str(order.MAX_BYTES + 1), "1" + "0" * 30):
        with pytest.raises(ValueError, match="more than the largest size, 1T"):
            parse_size(text)


def write_sell(pki, path, **kw):
    auth, leaf, _ = pki
    order.write_sell(path, host="h", port=1, price_milli=10, ca_pem=auth.cert_pem,
                     cert_pem=leaf.cert_pem, key_pem=leaf.key_pem, **kw)


def write_buy(pki, path, **kw):
    auth, leaf, _ = pki
    order.write_buy(path, host="h", port=1, price_milli=10, ca_pem=auth.cert_pem,
                    cert_pem=leaf.cert_pem, key_pem=leaf.key_pem, **kw)


@pytest.mark.parametrize("key", SELL_KEYS + BUY_KEYS)
def test_the_writers_refuse_what_the_loader_would(tmp_path, pki, key):
    r = order.RANGES[key]
    writer, suffix = (write_sell, "cpu") if key in SELL_KEYS else (write_buy, "buy")
    for value in (r.low - 1, r.high + 1, HUGE, -HUGE):
        path = tmp_path / f"x.{suffix}"
        with pytest.raises(ValueError, match=rf"{key} = .* is outside {re.escape(str(r))}"):
            writer(pki, path, **{key: value})
        assert not path.exists() and not list(tmp_path.iterdir())
    for value in (r.low, r.high):  # and what they write loads
        path = tmp_path / f"ok.{suffix}"
        writer(pki, path, **{key: value})
        o = order.load_sell(path) if suffix == "cpu" else order.load_buy(path)
        assert loaded(o, key) == value
        path.unlink()


def test_the_writers_refuse_a_bad_price_or_port(tmp_path, pki):
    auth, leaf, _ = pki
    pem = dict(ca_pem=auth.cert_pem, cert_pem=leaf.cert_pem, key_pem=leaf.key_pem)
    for price, port, match in ((order.MAX_PRICE_MILLI + 1, 1, "price"), (-1, 1, "price"),
                               (10, 0, "port"), (10, 65536, "port")):
        with pytest.raises(ValueError, match=match):
            order.write_sell(tmp_path / "x.cpu", host="h", port=port, price_milli=price, **pem)
        with pytest.raises(ValueError, match=match):
            order.write_buy(tmp_path / "x.buy", host="h", port=port, price_milli=price, **pem)
    assert not list(tmp_path.iterdir())


def test_allow_cpuid(tmp_path, pki):
    assert order.load_sell(write(tmp_path, sell_text(pki))).limits.allow_cpuid is False
    o = order.load_sell(write(tmp_path, sell_text(pki, limits="allow_cpuid = true\n")))
    assert o.limits.allow_cpuid is True
    with pytest.raises(OrderError, match=r"cpu0.cpu:\d+: limits.allow_cpuid: "):
        order.load_sell(write(tmp_path, sell_text(pki, limits="allow_cpuid = maybe\n")))
    for allow in (False, True):
        write_sell(pki, tmp_path / "w.cpu", allow_cpuid=allow)
        assert order.load_sell(tmp_path / "w.cpu").limits.allow_cpuid is allow
