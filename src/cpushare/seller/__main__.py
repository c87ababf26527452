"""``python -m cpushare.seller FILE.cpu``: run the seller core in the foreground.

For development and tests; the system service is ``cpushared`` (package
`cpushare.daemon`), which wraps the same core.  Logs go to stderr.

Signals: SIGTERM and SIGINT stop (handing the running task back), SIGHUP
re-reads the order file, SIGUSR1 pauses and SIGUSR2 resumes.

``--test-corrupt-outputs`` exists for the test suite only: the seller
then reports every output with its first byte flipped, to exercise the
market's redundancy checks.  It is a flag of this development runner and
nowhere else: the daemon has no such switch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from ..order import OrderError, load_sell
from .core import Seller


class _CorruptingSeller(Seller):
    """A dishonest seller, for tests of redundancy (see --test-corrupt-outputs)."""

    def _output_for_result(self, output: bytes) -> bytes:
        if not output:
            return b"\xff"
        return bytes([output[0] ^ 0xFF]) + output[1:]


def _default_cache(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "cpushare" / f"images-{name}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cpushare.seller",
        description="Sell one CPU in the foreground under a sell order (development runner; "
                    "the service is cpushared).")
    p.add_argument("order", metavar="FILE.cpu", help="the sell order")
    p.add_argument("--cache-dir", type=Path,
                   help="image cache directory (default ~/.cache/cpushare/images-NAME)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every task (DEBUG)")
    p.add_argument("--meter-interval", type=float, default=None, metavar="SECONDS",
                   help="kvm: seconds between the CPU-time reports of a lease (10)")
    p.add_argument("--powerdown-grace", type=float, default=None, metavar="SECONDS",
                   help="kvm: seconds a guest has to power off before it is killed (30)")
    p.add_argument("--test-corrupt-outputs", action="store_true",
                   help="TESTS ONLY: report corrupted outputs (a dishonest seller)")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        order = load_sell(args.order)
    except OrderError as e:
        print(f"cpushare.seller: {e}", file=sys.stderr)
        return 2
    cls = _CorruptingSeller if args.test_corrupt_outputs else Seller
    seller = cls(order, cache_dir=args.cache_dir or _default_cache(order.name))
    if args.meter_interval is not None:
        if not 0.1 <= args.meter_interval <= 3600:
            print("cpushare.seller: --meter-interval must be 0.1..3600 seconds", file=sys.stderr)
            return 2
        seller.METER_INTERVAL = args.meter_interval
    if args.powerdown_grace is not None:
        if not 0 <= args.powerdown_grace <= 3600:
            print("cpushare.seller: --powerdown-grace must be 0..3600 seconds", file=sys.stderr)
            return 2
        seller.POWERDOWN_GRACE = args.powerdown_grace

    def reload() -> None:
        try:
            seller.reload(load_sell(args.order))
        except OrderError as e:
            logging.getLogger("cpushare.seller").error("reload refused: %s", e)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, seller.stop)
        loop.add_signal_handler(signal.SIGINT, seller.stop)
        loop.add_signal_handler(signal.SIGHUP, reload)
        loop.add_signal_handler(signal.SIGUSR1, seller.pause)
        loop.add_signal_handler(signal.SIGUSR2, seller.resume)
        await seller.run()

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
