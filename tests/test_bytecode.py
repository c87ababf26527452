"""The bytecode image format: pack, parse, validate, and fuzzing of the parser."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpushare import bytecode
from cpushare.bytecode import (DEFAULT_STACK_SIZE, DEFAULT_TEXT_ADDRESS, HEADER_SIZE, MAX_REGION,
                               MAX_STACK, PAGE, STACK_TOP, USER_MAX, USER_MIN, BytecodeError, Image,
                               parse)

# The header as cpushare-bytecode(5) documents it, written out here on its
# own so that a change to the module's layout shows up as a failing test.
HEADER = struct.Struct("<8sHHIQQQQQQQ32s24s")


def raw(text=b"\x90\xc3", *, magic=b"CPUSHBC\0", version=1, header_size=128, flags=0,
        text_address=DEFAULT_TEXT_ADDRESS, text_size=None, data=b"", data_address=0,
        data_size=None, bss_size=0, stack_size=DEFAULT_STACK_SIZE, entry=None,
        reserved=b"\0" * 24, sha=None, tail=b""):
    """Pack a header by hand, with a correct SHA-256 unless one is given."""
    fields = [magic, version, header_size, flags, text_address,
              len(text) if text_size is None else text_size, data_address,
              len(data) if data_size is None else data_size, bss_size, stack_size,
              text_address if entry is None else entry]
    if sha is None:
        h = hashlib.sha256(HEADER.pack(*fields, b"\0" * 32, reserved))
        h.update(text)
        h.update(data)
        sha = h.digest()
    return HEADER.pack(*fields, sha, reserved) + text + data + tail


def refused(blob, *words):
    with pytest.raises(BytecodeError) as info:
        parse(blob, where="job.bin")
    msg = str(info.value)
    assert msg.startswith("job.bin: "), msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# -- what parses -------------------------------------------------------------

def test_header_layout_matches_the_documented_one():
    assert HEADER.size == HEADER_SIZE == 128
    img = Image(text=b"\x90" * 10, entry=DEFAULT_TEXT_ADDRESS + 3, data=b"abc",
                data_address=DEFAULT_TEXT_ADDRESS + PAGE, bss_size=5000, stack_size=8 * PAGE)
    assert img.pack() == raw(b"\x90" * 10, entry=DEFAULT_TEXT_ADDRESS + 3, data=b"abc",
                             data_address=DEFAULT_TEXT_ADDRESS + PAGE, bss_size=5000,
                             stack_size=8 * PAGE)
    assert img.sha256 == img.pack()[72:104]
    assert img.digest == img.sha256.hex()


def test_image_without_data_parses():
    img = parse(raw(b"\x0f\x05"))
    assert img.data == b"" and img.data_address == 0 and img.bss_size == 0
    assert [r.name for r in img.regions()] == ["text", "stack"]
    assert img.memory_size == PAGE + DEFAULT_STACK_SIZE


def test_image_with_only_bss_parses():
    img = parse(raw(data_address=DEFAULT_TEXT_ADDRESS + PAGE, bss_size=3 * PAGE + 1))
    assert img.data == b"" and img.bss_size == 3 * PAGE + 1
    data = [r for r in img.regions() if r.name == "data"][0]
    assert (data.start, data.size) == (DEFAULT_TEXT_ADDRESS + PAGE, 4 * PAGE)


def test_layout_of_an_image_with_data():
    img = parse(raw(b"\xc3" * (PAGE + 1), data=b"d" * 10, data_address=DEFAULT_TEXT_ADDRESS + 2 * PAGE,
                    bss_size=100, stack_size=4 * PAGE))
    assert [(r.name, r.start, r.size) for r in img.regions()] == [
        ("text", DEFAULT_TEXT_ADDRESS, 2 * PAGE),
        ("data", DEFAULT_TEXT_ADDRESS + 2 * PAGE, PAGE),
        ("stack", STACK_TOP - 4 * PAGE, 4 * PAGE),
    ]
    assert img.stack_address == STACK_TOP - 4 * PAGE
    assert img.memory_size == 7 * PAGE


def test_pack_parse_round_trip():
    img = Image(text=b"\x31\xff\xb8\x3c\x00\x00\x00\x0f\x05", entry=DEFAULT_TEXT_ADDRESS,
                data=b"\1\2\3", data_address=0x600000, bss_size=77)
    assert parse(img.pack()) == img


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "job.bin"
    path.write_bytes(raw())
    assert bytecode.load(path).text == b"\x90\xc3"
    path.write_bytes(raw()[:-1])
    with pytest.raises(BytecodeError, match=str(path)):
        bytecode.load(path)


# -- what is refused, and that the message says why -----------------------------

def test_refuses_bad_magic():
    refused(raw(magic=b"\x7fELF\2\1\1\0"), "bad magic", "offset 0")


def test_refuses_unknown_version():
    refused(raw(version=2), "unsupported version 2", "offset 8")


def test_refuses_wrong_header_size():
    refused(raw(header_size=64), "header_size 64")


def test_refuses_reserved_flags_and_bytes():
    refused(raw(flags=1), "flags 0x1", "offset 12")
    refused(raw(reserved=b"\0" * 23 + b"\1"), "reserved bytes", "offset 104")


def test_refuses_truncated_header():
    refused(raw()[:100], "100 bytes", "shorter than the 128-byte header")
    refused(b"", "0 bytes")


def test_refuses_truncated_body_and_trailing_bytes():
    blob = raw(b"\x90" * 10, data=b"xyz", data_address=0x600000)
    refused(blob[:-1], "length 140", "text_size 10", "data_size 3", "= 141")
    refused(blob + b"\0", "length 142", "= 141")
    refused(raw(tail=b"garbage"), "does not match the header")


def test_refuses_sha_mismatch():
    blob = bytearray(raw(b"\x90" * 8))
    blob[HEADER_SIZE + 3] ^= 1
    refused(bytes(blob), "SHA-256 mismatch", "offset 72")
    refused(raw(sha=b"\1" * 32), "SHA-256 mismatch", "0101")


def test_refuses_empty_text():
    refused(raw(b"", entry=DEFAULT_TEXT_ADDRESS), "text is empty")


def test_refuses_oversized_regions():
    refused(raw(text_size=MAX_REGION + 1), "text_size", "exceeds")
    refused(raw(bss_size=MAX_REGION + 1, data_address=0x600000), "bss_size", "exceeds")
    refused(raw(data=b"x", bss_size=MAX_REGION, data_address=0x600000),
            "data_size + bss_size", "exceeds the maximum")


def test_refuses_bad_stack_sizes():
    refused(raw(stack_size=0), "stack_size 0 is outside")
    refused(raw(stack_size=PAGE + 1), "stack_size 0x1001", "page size")
    refused(raw(stack_size=MAX_STACK + PAGE), f"stack_size {MAX_STACK + PAGE} is outside")


def test_refuses_unaligned_addresses():
    refused(raw(text_address=DEFAULT_TEXT_ADDRESS + 1, entry=DEFAULT_TEXT_ADDRESS + 1),
            "text_address 0x400001", "page size")
    refused(raw(data=b"x", data_address=0x600010), "data_address 0x600010")


def test_refuses_data_address_without_data_and_data_without_address():
    refused(raw(data_address=0x600000), "data_address 0x600000 is set but there is no data")
    refused(raw(data=b"x", data_address=0), "data or bss present but data_address is 0")
    refused(raw(bss_size=1, data_address=0), "data_address is 0")


def test_refuses_entry_outside_text():
    refused(raw(b"\x90" * 4, entry=DEFAULT_TEXT_ADDRESS + 4), "entry 0x400004 is outside text",
            "[0x400000, 0x400004)")
    refused(raw(entry=DEFAULT_TEXT_ADDRESS - 1), "entry 0x3fffff")
    refused(raw(data=b"\x90", data_address=0x600000, entry=0x600000), "entry 0x600000")


def test_refuses_regions_outside_the_user_range():
    refused(raw(text_address=0, entry=0), "text region [0x0, 0x1000) lies outside the user range",
            f"[{USER_MIN:#x}, {USER_MAX:#x})")
    refused(raw(text_address=USER_MIN - PAGE, entry=USER_MIN - PAGE), "text region", "outside")
    refused(raw(data=b"x", data_address=USER_MAX), "data region [0x80000000", "outside")
    refused(raw(text_address=1 << 40, entry=1 << 40), "text region", "outside the user range")
    refused(raw(data=b"x", data_address=USER_MAX - PAGE, bss_size=PAGE), "data region", "outside")


def test_refuses_overlapping_text_and_data():
    msg = refused(raw(b"\x90" * (PAGE + 1), data=b"x", data_address=DEFAULT_TEXT_ADDRESS + PAGE),
                  "text region [0x400000, 0x402000) overlaps data region [0x401000, 0x402000)")
    assert "guard page" not in msg


def test_refuses_data_on_the_stack_and_on_its_guard_page():
    stack = STACK_TOP - DEFAULT_STACK_SIZE
    refused(raw(data=b"x", data_address=stack),
            f"data region [{stack:#x}, {stack + PAGE:#x}) overlaps stack region [{stack:#x}, {STACK_TOP:#x})")
    refused(raw(data=b"x", data_address=stack - PAGE),
            f"data region [{stack - PAGE:#x}, {stack:#x}) overlaps the stack's guard page "
            f"[{stack - PAGE:#x}, {stack:#x})")
    # one page further down is fine: the guard page stays free
    parse(raw(data=b"x", data_address=stack - 2 * PAGE))
    refused(raw(text_address=stack - PAGE, entry=stack - PAGE), "text region", "guard page")
    refused(raw(data=b"x", data_address=stack - 2 * PAGE, bss_size=PAGE), "data region", "guard page")


def test_validate_refuses_what_pack_would_write():
    with pytest.raises(BytecodeError, match="entry"):
        Image(text=b"\x90", entry=0).pack()
    with pytest.raises(BytecodeError, match="negative"):
        Image(text=b"\x90", entry=DEFAULT_TEXT_ADDRESS, bss_size=-1, data_address=0x600000).validate()


# -- property-based ------------------------------------------------------------

@st.composite
def images(draw):
    text = draw(st.binary(min_size=1, max_size=3 * PAGE))
    text_pages = bytecode.page_up(len(text)) // PAGE
    text_address = draw(st.integers(USER_MIN // PAGE, 0x1000).map(lambda p: p * PAGE))
    entry = text_address + draw(st.integers(0, len(text) - 1))
    stack_size = draw(st.integers(1, 64)) * PAGE
    data, data_address, bss = b"", 0, 0
    if draw(st.booleans()):
        data = draw(st.binary(max_size=2 * PAGE))
        bss = draw(st.integers(0 if data else 1, 5 * PAGE))
        gap = draw(st.integers(0, 16))
        data_address = text_address + (text_pages + gap) * PAGE
    return Image(text=text, entry=entry, text_address=text_address, data=data,
                 data_address=data_address, bss_size=bss, stack_size=stack_size)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(images())
def test_valid_images_round_trip(img):
    blob = img.pack()
    again = parse(blob)
    assert again == img
    assert again.pack() == blob
    assert len(blob) == HEADER_SIZE + len(img.text) + len(img.data)


def _parse_or_refuse(blob):
    try:
        return parse(blob)
    except BytecodeError as e:
        assert str(e).startswith("image: ") and len(str(e)) > len("image: ")
        return None


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_bytecode_error(blob):
    assert _parse_or_refuse(blob) is None


@FUZZ
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE + 64))
def test_random_headers_behind_the_magic_only_raise_bytecode_error(blob):
    blob = bytecode.MAGIC + b"\1\0\x80\0" + blob[12:]
    _parse_or_refuse(blob)


@FUZZ
@given(images(), st.data())
def test_mutated_images_only_raise_bytecode_error(img, data):
    blob = bytearray(img.pack())
    kind = data.draw(st.sampled_from(["flip", "field", "truncate", "append", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
    elif kind == "field":
        # rewrite one 8-byte header field, then fix the SHA so the field's
        # value (not the checksum) is what the parser must judge
        off = data.draw(st.sampled_from([16, 24, 32, 40, 48, 56, 64]))
        value = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 2 * USER_MAX)))
        blob[off:off + 8] = value.to_bytes(8, "little")
        blob[72:104] = b"\0" * 32
        blob[72:104] = hashlib.sha256(bytes(blob)).digest()
    elif kind == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    elif kind == "append":
        blob += data.draw(st.binary(min_size=1, max_size=64))
    else:
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=32))
    parsed = _parse_or_refuse(bytes(blob))
    if parsed is not None:
        # anything accepted is a valid, self-consistent image
        assert parsed.validate() is parsed
        assert parsed.pack() == bytes(blob)


# -- the manual page -----------------------------------------------------------

def test_man_page_renders_without_warnings_and_documents_the_header():
    import os
    import shutil
    import subprocess
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "man" / "cpushare-bytecode.5"
    assert shutil.which("man"), "man (man-db) is needed: make deps installs it"
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80")
    proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = page.read_text()
    for offset, field in ((0, "magic"), (8, "version"), (16, "text_address"), (56, "stack_size"),
                          (64, "entry"), (72, "sha256")):
        assert f".B {offset}\\fR" in text and f".IR {field}" in text
    assert f"{STACK_TOP:#x}" in text and f"[{USER_MIN:#x}, {USER_MAX:#x})" in text
