"""The Floyd-Steinberg study: the job's kernel, the image pool, the buyer
program (examples/floyd-steinberg), through the local sandbox and the market."""

from __future__ import annotations

import csv
import json
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FS_DIR = ROOT / "examples" / "floyd-steinberg"
sys.path.insert(0, str(FS_DIR))

import fsjob  # noqa: E402
import pool as imagepool  # noqa: E402
import study  # noqa: E402

from cpushare import bytecode, sandbox  # noqa: E402

LIMITS = sandbox.Limits(cpu_seconds=10, wall_seconds=30)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("fs-build")
    return bytecode.load(fsjob.build_job(d)), fsjob.build_native(d)


def sandboxed(image, message):
    r = sandbox.run(image, message, LIMITS)
    assert r.signal is None, r.describe()
    return r.exit_status, r.output


# -- a reference implementation, in Python, of what dither.c computes ----------

def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def ref_dither(px: list[int], w: int, h: int, serpentine: bool) -> list[int]:
    out = [0] * (w * h)
    cur = [0] * (w + 2)
    for y in range(h):
        nxt = [0] * (w + 2)
        back = serpentine and y % 2 == 1
        dx = -1 if back else 1
        xs = range(w - 1, -1, -1) if back else range(w)
        for x in xs:
            v = px[y * w + x] * 256 + cur[x + 1]
            o = 255 if v >= 128 * 256 else 0
            out[y * w + x] = o
            e = v - o * 256
            a, b, c = _cdiv(e * 7, 16), _cdiv(e * 3, 16), _cdiv(e * 5, 16)
            cur[x + dx + 1] += a
            nxt[x - dx + 1] += b
            nxt[x + 1] += c
            nxt[x + dx + 1] += e - a - b - c
        cur = nxt
    return out


def ref_exp(x: float) -> float:
    y = x / 1024.0
    r = 1.0 + y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y / 120.0))))
    for _ in range(10):
        r *= r
    return r


def ref_kernel(sigma16: int) -> list[int]:
    if sigma16 == 0:
        return [65536]
    radius = (3 * sigma16 + 15) // 16
    s = sigma16 / 16.0
    g = [ref_exp(-float(k * k) / (2.0 * s * s)) for k in range(radius + 1)]
    total = 0.0
    for k in range(radius + 1):
        total += 2.0 * g[k] if k else g[k]
    w = [0] * (radius + 1)
    rest = 65536
    for k in range(radius, 0, -1):
        w[k] = int(g[k] / total * 65536.0 + 0.5)
        rest -= 2 * w[k]
    w[0] = rest
    return w


def ref_sse(src: list[int], dst: list[int], w: int, h: int, sigma16: int) -> int:
    wt = ref_kernel(sigma16)
    r = len(wt) - 1
    diff = [s - d for s, d in zip(src, dst)]
    hb = [0] * (w * h)
    for y in range(h):
        for x in range(w):
            hb[y * w + x] = sum(wt[abs(k)] * diff[y * w + min(max(x + k, 0), w - 1)]
                                for k in range(-r, r + 1))
    sse = 0
    for y in range(h):
        for x in range(w):
            acc = sum(wt[abs(k)] * hb[min(max(y + k, 0), h - 1) * w + x] for k in range(-r, r + 1))
            v = (acc + (1 << 23)) >> 24
            sse += v * v
    return sse


def small_image(w: int, h: int, seed: int = 1) -> bytes:
    r = imagepool.Rand(seed)
    return imagepool.gen_texture(r, w, h).tobytes()


# -- the kernel ---------------------------------------------------------------------

def test_job_matches_the_reference_implementation(built):
    image, _native = built
    w, h = 23, 17
    px = small_image(w, h)
    sigmas = (0, 16, 24, 40)
    status, out = sandboxed(image, fsjob.encode(w, h, px, sigmas16=sigmas, images=True))
    assert status == 0, out
    m = fsjob.decode(out)
    raster = ref_dither(list(px), w, h, False)
    serp = ref_dither(list(px), w, h, True)
    assert list(m.raster) == raster
    assert list(m.serpentine) == serp
    assert m.sum == sum(px)
    assert m.white_raster == sum(1 for v in raster if v)
    assert m.differ == sum(1 for a, b in zip(raster, serp) if a != b)
    for i, s in enumerate(sigmas):
        assert m.blurs[i].sigma16 == s
        assert m.blurs[i].radius == len(ref_kernel(s)) - 1
        assert m.blurs[i].sse_raster == ref_sse(list(px), raster, w, h, s)
        assert m.blurs[i].sse_serpentine == ref_sse(list(px), serp, w, h, s)


def test_kernel_weights_are_gaussian():
    w = ref_kernel(32)                          # sigma 2 px, radius 6
    assert w[0] + 2 * sum(w[1:]) == 65536
    assert all(a > b for a, b in zip(w, w[1:]))
    import math
    for k in range(len(w)):     # rounded true Gaussian; the centre takes the remainders
        true = math.exp(-k * k / 8) / sum(math.exp(-j * j / 8) for j in range(-6, 7)) * 65536
        assert abs(w[k] - true) <= (0.5 + 1e-6 if k else 6.0)


def test_dithered_images_are_binary_and_keep_mean_brightness(built):
    image, _native = built
    images = list(imagepool.pool(8)) + [
        imagepool.PoolImage("flat-100", 64, 48, bytes([100]) * 64 * 48),
        imagepool.PoolImage("flat-3", 40, 40, bytes([3]) * 1600),
    ]
    for im in images:
        status, out = sandboxed(image, fsjob.encode(im.width, im.height, im.pixels, images=True))
        assert status == 0, (im.name, out)
        m = fsjob.decode(out, where=im.name)
        for result in (m.raster, m.serpentine):
            assert set(result) <= {0, 255}, im.name
        # Error diffusion loses only what falls off the right, left and bottom
        # edges: at most one pixel's error (< 256) per edge pixel.
        bound = 255 * (2 * im.height + im.width) / (im.width * im.height)
        for mean in (m.mean_raster, m.mean_serpentine):
            assert abs(mean - m.mean) <= bound, (im.name, mean, m.mean, bound)
        if m.pixels >= 10_000:      # and on real-sized images, far less
            assert abs(m.mean_raster - m.mean) < 0.5, im.name


def test_serpentine_differs_from_raster(built):
    image, _native = built
    im = next(imagepool.pool(1))
    status, out = sandboxed(image, fsjob.encode(im.width, im.height, im.pixels, images=True))
    m = fsjob.decode(out)
    assert 0 < m.differ < m.pixels
    assert m.differ == sum(a != b for a, b in zip(m.raster, m.serpentine))
    w = m.width
    # the first row is scanned the same way by both
    assert m.raster[:w] == m.serpentine[:w]
    assert m.blurs[-1].sse_raster != m.blurs[-1].sse_serpentine


def test_native_and_sandboxed_runs_agree_bit_for_bit(built):
    image, native = built
    for im in imagepool.pool(10):
        msg = fsjob.encode(im.width, im.height, im.pixels, images=True)
        s_status, s_out = sandboxed(image, msg)
        n_status, n_out = fsjob.run_native(native, msg)
        assert (s_status, s_out) == (n_status, n_out), im.name
    msgs = [fsjob.encode(im.width, im.height, im.pixels) for im in imagepool.pool(4)]
    batch = fsjob.run_native_batch(native, msgs)
    assert [status for status, _ in batch] == [0, 0, 0, 0]
    assert [out for _, out in batch] == [sandboxed(image, m)[1] for m in msgs]
    # several messages in one run: one result each, in order
    status, out = sandboxed(image, b"".join(msgs))
    assert status == 0 and out == b"".join(o for _, o in batch)


@pytest.mark.parametrize("message, status, text", [
    (fsjob.encode(2000, 10, b"", check=False), 3, b"image 2000x10 exceeds the maximum 1024x1024"),
    (fsjob.encode(1025, 1, bytes(1025), check=False), 3, b"exceeds the maximum"),
    (b"", 2, b"no input"),
    (b"\x05\x00", 2, b"input ends inside the message length"),
    (struct.pack("<I", 24) + b"XXXX" + bytes(20), 2, b"bad magic"),
    (fsjob.encode(4, 4, bytes(15), check=False), 2, b"does not hold a header and 16 pixels"),
    (fsjob.encode(4, 4, bytes(16))[:30], 2, b"input ends inside the pixels"),
    (fsjob.encode(4, 4, bytes(16), sigmas16=(300,), check=False), 2, b"blur width slot 0"),
    (fsjob.encode(0, 4, b"", check=False), 2, b"image size 0x4 is empty"),
])
def test_job_refuses_bad_input_with_a_readable_message(built, message, status, text):
    image, native = built
    got_status, out = sandboxed(image, message)
    assert got_status == status
    assert out.startswith(b"dither: ") and text in out and out.endswith(b"\n"), out
    assert fsjob.run_native(native, message) == (got_status, out)
    with pytest.raises(fsjob.JobError, match="dither: "):
        fsjob.decode(out)


def test_encode_refuses_what_the_job_would():
    with pytest.raises(ValueError, match="2000x10"):
        fsjob.encode(2000, 10, bytes(20000))
    with pytest.raises(ValueError, match="15 pixel bytes"):
        fsjob.encode(4, 4, bytes(15))


# -- the pool ----------------------------------------------------------------------

def test_pool_is_deterministic_and_prefix_stable():
    a = list(imagepool.pool(30))
    b = list(imagepool.pool(30))
    assert imagepool.digest(a) == imagepool.digest(b)
    assert imagepool.digest(list(imagepool.pool(12))) == imagepool.digest(a[:12])
    assert len({im.name for im in a}) == 30
    for im in a:
        assert 1 <= im.width <= 1024 and 1 <= im.height <= 1024
        assert len(im.pixels) == im.width * im.height
    # generated images depend on their number only
    assert imagepool.generated(7) == imagepool.generated(7)
    assert imagepool.generated(7).pixels != imagepool.generated(8).pixels
    assert imagepool.Rand(3).bits((4,)).tolist() == imagepool.Rand(3).bits((4,)).tolist()


def test_pool_holds_the_shipped_photographs_and_many_kinds():
    real = [name for name, _ in imagepool.real_images()]
    if not real:
        pytest.skip("no Debian-shipped images here (python3-matplotlib, python3-scipy)")
    names = [im.name for im in imagepool.pool(len(real) + 200)]
    assert names[:len(real)] == real
    kinds = {study.kind_of(n) for n in names[len(real):]}
    assert {"crop", "gradient", "texture", "shapes", "flat", "noise"} <= kinds


def test_pool_size_is_bounded():
    with pytest.raises(ValueError, match="10000"):
        list(imagepool.pool(10_001))


# -- the study ---------------------------------------------------------------------

def _outcome(i, r, s):
    blur = fsjob.Blur(16, 3, int(r * 65536 * 100), int(s * 65536 * 100))
    m = fsjob.Measures(10, 10, 100, 12800, 50, 50, 3, (blur,))
    return study.Outcome(i, f"texture-{i:05d}", 10, 10, True, measures=m)


def test_aggregate_counts_and_averages():
    outs = [_outcome(0, 4.0, 2.0), _outcome(1, 1.0, 3.0), _outcome(2, 2.0, 2.0), _outcome(3, 5.0, 1.0)]
    outs.append(study.Outcome(4, "flat-00004", 10, 10, False, "exit status 2"))
    [t] = study.aggregate(outs)
    assert t["images"] == 4
    assert (t["serpentine_better"], t["raster_better"], t["ties"]) == (2, 1, 1)
    assert t["mean_raster"] == pytest.approx(3.0) and t["mean_serpentine"] == pytest.approx(2.0)
    assert t["median_raster"] == pytest.approx(3.0) and t["median_serpentine"] == pytest.approx(2.0)
    assert t["median_ratio"] == pytest.approx((0.5 + 1.0) / 2)
    assert "serpentine better" in study.format_table([t])


def test_task_outcomes_split_a_task_of_several_images(built):
    image, _native = built
    ims = list(imagepool.pool(3))
    meta = {i: (im.name, im.width, im.height) for i, im in enumerate(ims)}
    msgs = [fsjob.encode(im.width, im.height, im.pixels) for im in ims]
    status, out = sandboxed(image, b"".join(msgs))
    outs = study._task_outcomes(0, 3, meta, out, status, cpu_ms=31, cost_milli=2)
    assert [o.ok for o in outs] == [True, True, True]
    assert [o.output for o in outs] == [sandboxed(image, m)[1] for m in msgs]
    assert [o.cpu_ms for o in outs] == [11, 10, 10]          # nothing lost in the split
    assert [o.cost_milli for o in outs] == [1, 1, 0]
    # the second image refused: the first keeps its result, the third never ran
    bad = fsjob.encode(2000, 10, b"", check=False)
    status, out = sandboxed(image, msgs[0] + bad + msgs[2])
    outs = study._task_outcomes(0, 3, meta, out, status)
    assert [o.ok for o in outs] == [True, False, False]
    assert "exceeds the maximum" in outs[1].error and "earlier image" in outs[2].error
    # a task the market failed fails all its images, with the reason
    outs = study._task_outcomes(3, 2, {3: ("a", 1, 1), 4: ("b", 1, 1)}, b"", None, "the market "
                                "failed the task: dispute: no agreement")
    assert [o.error for o in outs] == ["the market failed the task: dispute: no agreement"] * 2


def test_sample_indices_spread_over_the_run():
    assert study.sample_indices(100, 5) == {0, 25, 50, 74, 99}
    assert study.sample_indices(3, 20) == {0, 1, 2}
    assert study.sample_indices(0, 5) == set()


def test_native_check_catches_a_wrong_result(built, tmp_path):
    run = study.run_local(6, check=6, build_dir=tmp_path, quiet=True)
    assert study.check_native(run, tmp_path)["mismatches"] == []
    o = run.outcomes[0]
    o.output = o.output[:-1] + bytes([o.output[-1] ^ 1])
    check = study.check_native(run, tmp_path)
    assert check["mismatches"] == [o.name] and check["identical"] == 5


def _check_outputs(out: Path, n: int) -> dict:
    with open(out / "results.csv") as f:
        data = list(csv.DictReader(f))
    assert len(data) == n and all(r["ok"] == "1" for r in data)
    assert [int(r["index"]) for r in data] == list(range(n))
    assert float(data[0]["mse_raster_s4"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == n
    assert summary["native_check"]["identical"] == summary["native_check"]["checked"] > 0
    for t in summary["table"]:
        assert t["serpentine_better"] + t["raster_better"] + t["ties"] == n
    png = (out / "study.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    return summary


def test_study_through_the_local_sandbox(tmp_path, capsys):
    out = tmp_path / "out"
    assert study.main(["--local", "--images", "12", "--jobs", "2", "--per-task", "5",
                       "--out", str(out), "--quiet"]) == 0
    summary = _check_outputs(out, 12)
    assert summary["mode"] == "local"
    text = capsys.readouterr().out
    assert "serpentine better" in text
    assert "native check: 12/12 sampled results bit-identical" in text


def test_study_through_the_market(tmp_path):
    import subprocess
    from test_e2e_support import PYTHON, LocalMarket, env

    market = LocalMarket(tmp_path / "market")
    try:
        market.serve()
        for i in (1, 2):
            market.account(f"seller{i}")
            market.seller(market.sell_order(f"seller{i}", f"seller{i}", price="36.000"))
        market.account("lab", 100)
        order = market.buy_order("lab", price="72.000", redundancy=2, max_cpu_seconds=10)
        out = tmp_path / "out"
        p = subprocess.run([PYTHON, str(FS_DIR / "study.py"), "--order", str(order), "--images",
                            "20", "--out", str(out), "--check", "5", "--quiet"],
                           capture_output=True, text=True, env=env(), timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        summary = _check_outputs(out, 20)
        # 20 images, 4 to a task (the default), on 2 sellers each
        assert summary["mode"] == "market" and summary["tasks"] == 10
        assert summary["cost_milli"] > 0
        assert market.ledger_check().returncode == 0
        spent = 100_000 - market.balance_milli("lab")
        earned = market.balance_milli("seller1") + market.balance_milli("seller2")
        assert spent == summary["cost_milli"] == earned
        assert market.balance_milli("seller1") > 0 and market.balance_milli("seller2") > 0
    finally:
        market.close()
