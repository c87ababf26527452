"""cpushare.protocol: frames, schema checks, pricing, TLS contexts."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import struct

import pytest
from hypothesis import given, settings, strategies as st

from cpushare import protocol
from cpushare.market import ca
from cpushare.protocol import Message, ProtocolError, cost_milli, encode, read_message


def read_all(data: bytes, max_payload: int = protocol.DEFAULT_MAX_PAYLOAD, eof: bool = True):
    async def main():
        r = asyncio.StreamReader()
        r.feed_data(data)
        if eof:
            r.feed_eof()
        out = []
        while True:
            m = await read_message(r, max_payload)
            if m is None:
                return out
            out.append(m)
    return asyncio.run(main())


def raw(header: bytes, payload: bytes = b"", hlen: int | None = None,
        plen: int | None = None) -> bytes:
    return struct.pack(">II", len(header) if hlen is None else hlen,
                       len(payload) if plen is None else plen) + header + payload


def test_round_trip_of_several_frames():
    frames = (encode("ready") + encode("submit", b"\0input\xff", ref="r1", image="a" * 64)
              + encode("result", b"out", attempt=7, exit_status=None, signal=9, reason="cpu",
                       cpu_ms=12, output_sha256=protocol.digest(b"out")))
    got = read_all(frames)
    assert [m.type for m in got] == ["ready", "submit", "result"]
    assert got[1].payload == b"\0input\xff" and got[1]["ref"] == "r1"
    assert got[2]["exit_status"] is None and got[2].get("signal") == 9
    assert got[2].get("absent", "dflt") == "dflt"
    assert "type" not in got[1].fields


def test_encode_layout():
    f = encode("ping", b"xy", t=5)
    hlen, plen = struct.unpack(">II", f[:8])
    assert plen == 2 and f[-2:] == b"xy"
    assert json.loads(f[8:8 + hlen]) == {"t": 5, "type": "ping"}


def test_encode_refuses_unknown_types():
    with pytest.raises(ValueError, match="unknown message type 'nope'"):
        encode("nope")


def test_unknown_fields_are_ignored():
    m = read_all(raw(b'{"type":"ready","future":[1,2]}'))[0]
    assert m.type == "ready" and m["future"] == [1, 2]


def test_clean_eof_is_none_and_a_cut_frame_is_an_error():
    assert read_all(b"") == []
    whole = encode("ready")
    for cut in (3, 8, len(whole) - 1):
        with pytest.raises(ProtocolError, match="truncated frame") as e:
            read_all(whole[:cut])
        assert e.value.code == "frame"


@pytest.mark.parametrize("data, match", [
    (raw(b"", hlen=0), "header length 0 outside"),
    (raw(b"", hlen=protocol.MAX_HEADER + 1), f"header length {protocol.MAX_HEADER + 1}"),
    (raw(b'{"type":"ready"}', plen=101), "payload length 101 exceeds the limit 100"),
    (raw(b"{not json"), "not UTF-8 JSON"),
    (raw(b'{"type":"\xff"}'), "not UTF-8 JSON"),
    (raw(b'"ready"'), "not a JSON object"),
    (raw(b'{"t":1}'), "no string 'type'"),
    (raw(b'{"type":7}'), "no string 'type'"),
    (raw(b'{"type":"bogus"}'), "unknown message type 'bogus'"),
    (raw(b'{"type":"settled","attempt":1,"paid_milli":"1","accepted":true}'),
     "field 'paid_milli' must be an integer in 0"),
    (raw(b'{"type":"settled","attempt":1,"paid_milli":1.5,"accepted":true}'),
     "field 'paid_milli' must be an integer"),
    (raw(b'{"type":"settled","attempt":true,"paid_milli":1,"accepted":true}'),
     "field 'attempt' must be an integer"),
    # every integer a peer sends has a range (2**63 once reached SQLite)
    (raw(b'{"type":"result","attempt":1,"exit_status":0,"signal":null,"reason":"",'
         b'"cpu_ms":9223372036854775808,"output_sha256":"' + b"0" * 64 + b'"}'),
     "field 'cpu_ms' must be an integer in 0..31622400000"),
    (raw(b'{"type":"result","attempt":0,"exit_status":0,"signal":null,"reason":"",'
         b'"cpu_ms":1,"output_sha256":"' + b"0" * 64 + b'"}'),
     "field 'attempt' must be an integer in 1.."),
    (raw(b'{"type":"result","attempt":1,"exit_status":-1,"signal":null,"reason":"",'
         b'"cpu_ms":1,"output_sha256":"' + b"0" * 64 + b'"}'),
     "field 'exit_status' must be an integer in 0..255 or null"),
    (raw(b'{"type":"ready","slots":17}'), "field 'slots' must be an integer in 1..16"),
    (raw(b'{"type":"output","attempt":1,"offset":-5}'), "field 'offset' must be"),
    # 30,000 nested arrays fit in a header: a frame error, not a RecursionError
    (raw(b'{"type":"ping","x":' + b"[" * 30000 + b"]" * 30000 + b"}", hlen=None),
     "nested too deeply"),
    (raw(b'{"type":"settled","attempt":1,"paid_milli":1,"accepted":1}'),
     "field 'accepted' must be bool"),
    (raw(b'{"type":"result","attempt":1,"exit_status":0,"signal":null,"reason":"a\\u0000b",'
         b'"cpu_ms":1,"output_sha256":"' + b"0" * 64 + b'"}'),
     "field 'reason' holds a NUL character"),
    (raw(b'{"type":"hello","role":"seller"}'), "missing field 'version'"),
    (raw(b'{"type":"need_image","image":"ABC"}'), "not a SHA-256 hex digest"),
    (raw(b'{"type":"submit","image":"' + b"0" * 64 + b'","ref":"' + b"r" * 129 + b'"}'),
     "ref longer than 128"),
])
def test_malformed_frames(data, match):
    with pytest.raises(ProtocolError, match=match) as e:
        read_all(data, max_payload=100)
    assert e.value.code == "frame"
    assert str(e.value).startswith("frame: ")


def test_the_payload_limit_is_checked_before_reading_it():
    # only the 8 length bytes arrive: the error must come without waiting
    data = struct.pack(">II", 16, 1 << 30)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        read_all(data, eof=False)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["ready", "ping", "stream", "image"]), st.binary(max_size=2000),
       st.integers(min_value=1, max_value=2**40), st.text(max_size=50))
def test_round_trip_property(type_, payload, n, text):
    fields = {"ping": {"t": n}, "ready": {"extra": text}, "stream": {"session": n, "eof": True},
              "image": {"image": protocol.digest(text.encode())}}[type_]
    m = read_all(encode(type_, payload, **fields))[0]
    assert m == Message(type_, fields, payload)


@given(st.binary(max_size=64))
def test_garbage_never_escapes_as_another_exception(data):
    """Random bytes are frames or a ProtocolError, never another exception."""
    try:
        read_all(data, max_payload=32)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(protocol.SCHEMA)), st.integers(-(2**70), 2**70))
def test_out_of_range_integers_are_frame_errors(type_, n):
    """Any integer in any integer field is accepted only within its range."""
    for name, (tag, _) in protocol.SCHEMA[type_].items():
        if type(tag) is not protocol.Int:
            continue
        fields = {f: 1 if type(t) is protocol.Int else "0" * 64 if t in (protocol.STR, protocol.OPT_STR) else True
                  for f, (t, _) in protocol.SCHEMA[type_].items()}
        fields[name] = n
        if tag.lo <= n <= tag.hi:
            protocol.validate(type_, fields)
        else:
            with pytest.raises(ProtocolError, match=f"field {name!r} must be an integer"):
                protocol.validate(type_, fields)


def test_big_payloads_are_read_whole_and_a_cut_one_is_a_frame_error():
    big = os.urandom(3 << 20)  # above the size read in pieces
    frames = (protocol.encode("submit", big, ref="r", image="a" * 64)
              + b"".join(protocol.frame("result", big, attempt=1, exit_status=0, signal=None,
                                        reason="", cpu_ms=1, output_sha256="b" * 64))
              + encode("ready", slots=2))
    m1, m2, m3 = read_all(frames)
    assert m1.payload == big and m2.payload == big and m2["attempt"] == 1
    assert (m3.type, m3["slots"]) == ("ready", 2)
    with pytest.raises(ProtocolError, match=r"truncated frame: .*of 3145728"):
        read_all(encode("submit", big, ref="r", image="a" * 64)[:-1])


def test_frame_does_not_copy_a_big_payload():
    small = protocol.frame("image", b"x" * 10, image="a" * 64)
    assert small == [encode("image", b"x" * 10, image="a" * 64)]
    payload = b"y" * (protocol.BIG_PAYLOAD + 1)
    head, body = protocol.frame("image", payload, image="a" * 64)
    assert body is payload and head + body == encode("image", payload, image="a" * 64)


def test_schema_lists_every_documented_message():
    with open("docs/protocol.md", encoding="utf-8") as f:
        doc = f.read()
    for type_ in protocol.SCHEMA:
        assert f"    {type_} " in doc or f"    {type_}\t" in doc, f"{type_} not documented"


# --- pricing ------------------------------------------------------------------

@pytest.mark.parametrize("cpu_ms, price, cost", [
    (0, 1000, 0), (1, 1, 1), (3_600_000, 10, 10), (3_600_001, 10, 11),
    (1000, 36_000, 10), (1500, 36_000, 15), (10_000, 360_000, 1000), (1, 0, 0),
])
def test_cost_milli(cpu_ms, price, cost):
    assert cost_milli(cpu_ms, price) == cost


@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_cost_rounds_up_and_is_monotonic(cpu_ms, price):
    c = cost_milli(cpu_ms, price)
    assert isinstance(c, int)
    assert c * 3_600_000 >= cpu_ms * price > (c - 1) * 3_600_000 or c == 0
    assert cost_milli(cpu_ms + 1, price) >= c


def test_cost_refuses_negatives():
    with pytest.raises(ValueError):
        cost_milli(-1, 10)


# --- TLS ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki():
    auth = ca.make_ca()
    server = ca.issue(auth.cert_pem, auth.key_pem, "localhost", server_names=["localhost"])
    client = ca.issue(auth.cert_pem, auth.key_pem, "alice sell order 1")
    return auth, server, client


def test_tls_round_trip_and_peer_identity(pki):
    auth, server, client = pki

    async def main():
        seen = {}

        async def handle(r, w):
            seen["id"] = protocol.peer_identity(w.get_extra_info("ssl_object"))
            m = await read_message(r)
            await protocol.send(w, "pong", t=m["t"])
            w.close()

        srv = await asyncio.start_server(
            handle, "127.0.0.1", 0,
            ssl=protocol.server_context(auth.cert_pem, server.cert_pem, server.key_pem))
        port = srv.sockets[0].getsockname()[1]
        ctx = protocol.client_context(auth.cert_pem, client.cert_pem, client.key_pem)
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                             server_hostname="localhost")
        await protocol.send(w, "ping", t=42)
        assert (await read_message(r))["t"] == 42
        w.close()
        srv.close()
        return seen["id"]

    fp, cn = asyncio.run(main())
    assert fp == client.fingerprint == protocol.fingerprint_pem(client.cert_pem)
    assert cn == "alice sell order 1"


def test_the_client_checks_the_host_name(pki):
    auth, server, client = pki

    async def main():
        srv = await asyncio.start_server(
            lambda r, w: w.close(), "127.0.0.1", 0,
            ssl=protocol.server_context(auth.cert_pem, server.cert_pem, server.key_pem))
        port = srv.sockets[0].getsockname()[1]
        ctx = protocol.client_context(auth.cert_pem, client.cert_pem, client.key_pem)
        try:
            with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
                await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                              server_hostname="market.example.org")
        finally:
            srv.close()
    asyncio.run(main())


def test_contexts_refuse_unusable_credentials(pki):
    auth, server, client = pki
    with pytest.raises(ValueError, match="CA certificate is unusable"):
        protocol.client_context("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
                                client.cert_pem, client.key_pem)
    with pytest.raises(ValueError, match="certificate or key is unusable"):
        protocol.client_context(auth.cert_pem, client.cert_pem, server.key_pem)


def test_contexts_do_not_trust_the_system_store(pki):
    auth, _, client = pki
    ctx = protocol.client_context(auth.cert_pem, client.cert_pem, client.key_pem)
    assert len(ctx.get_ca_certs()) == 1
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2



# --- FrameWriter: what the seller and the buyer write with --------------------

def test_frame_writer_coalesces_small_frames_and_pieces_big_ones():
    import socket

    async def main():
        a, b = socket.socketpair()
        _, writer = await asyncio.open_connection(sock=a)
        peer, peer_writer = await asyncio.open_connection(sock=b, limit=1 << 20)
        out = protocol.FrameWriter(writer)
        writes: list[int] = []
        real_write = writer.write
        writer.write = lambda data: (writes.append(len(data)), real_write(data))[1]

        assert out.send("ping", t=1) and out.send("ping", t=2)
        assert writes == []  # queued until the loop turns
        await asyncio.sleep(0)
        assert len(writes) == 1  # both frames in one write

        big = os.urandom(3 * protocol.BIG_FRAME + 7)
        sending = asyncio.ensure_future(out.send_big("image", big, image="0" * 64))
        await asyncio.sleep(0)
        assert out.send("ping", t=3)  # waits: nothing is interleaved with the big frame
        got = [await protocol.read_message(peer, 1 << 22) for _ in range(4)]
        assert await sending is True
        assert [m.type for m in got] == ["ping", "ping", "image", "ping"]
        assert got[2].payload == big and got[3]["t"] == 3
        assert max(writes[1:]) <= protocol.BIG_FRAME  # the big payload went in pieces

        writer.close()
        assert not out.send("ping", t=4)  # closing: refused, not raised
        peer_writer.close()

    asyncio.run(main())


def test_a_byte_budget_makes_big_payloads_wait_their_turn():
    """Two readers of 3 MiB payloads under a 4 MiB budget: the second reads
    only once the first gives its bytes back."""
    async def main():
        budget = protocol.ByteBudget(4 << 20)
        frames = [encode("image", b"x" * (3 << 20), image="a" * 64) for _ in range(2)]
        readers = []
        for f in frames:
            r = asyncio.StreamReader(limit=1 << 22)
            r.feed_data(f)
            r.feed_eof()
            readers.append(r)
        first = await protocol.read_message(readers[0], 8 << 20, budget)
        assert first.held == 3 << 20 and budget.free == 1 << 20
        second = asyncio.ensure_future(protocol.read_message(readers[1], 8 << 20, budget))
        await asyncio.sleep(0.01)
        assert not second.done()
        budget.give(first.held)
        m = await asyncio.wait_for(second, 1)
        assert m.held == 3 << 20 and len(m.payload) == 3 << 20
        budget.give(m.held)
        assert budget.free == budget.total
        third = asyncio.ensure_future(budget.take(4 << 20))
        await asyncio.sleep(0)
        assert third.done()  # (nothing held)
    asyncio.run(main())
