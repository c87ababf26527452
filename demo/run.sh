#!/bin/bash
# demo/run.sh - the Floyd-Steinberg study on a CPUShare market of this machine.
#
#   make demo                  (IMAGES=1000)
#   make demo IMAGES=10000     (the whole pool)
#
# Starts a market (SQLite, its own CA) on a free loopback port with its
# state in $DEMO_OUT (default demo-out/), one seller daemon per core (accounts
# seller1..N, one sell order each), a buyer account "lab" with CPUCoins and a
# buy order with redundancy 2, runs examples/floyd-steinberg/study.py through
# it, and ends with a summary: images, tasks, wall time, images per second,
# CPUCoins earned per seller and spent by the buyer, the ledger check and
# the plot.  Everything it starts is stopped on the way out, also after a
# failure or Ctrl-C; it can run again (each run starts a fresh market).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
IMAGES=${IMAGES:-1000}
SELLERS=${SELLERS:-$(nproc)}
OUT=${DEMO_OUT:-$ROOT/demo-out}
ASK=${ASK:-360}            # CPUCoins per CPU-hour the sellers ask
BID=${BID:-720}            # and the buyer bids
COINS=${COINS:-10000}      # minted for the buyer
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

say() { printf 'demo: %s\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

case $IMAGES in ''|*[!0-9]*) die "IMAGES=$IMAGES is not a number of images (1..10000)";; esac
[ "$IMAGES" -ge 1 ] && [ "$IMAGES" -le 10000 ] || die "IMAGES=$IMAGES is outside 1..10000"
case $SELLERS in ''|*[!0-9]*|0) die "SELLERS=$SELLERS is not a positive number";; esac

RUN=$OUT/market
LOGS=$OUT/logs
DB=$RUN/market.db
PIDS=()

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ ${#PIDS[@]} -gt 0 ]; then
        say "stopping ${#PIDS[@]} processes (${PIDS[*]})"
        for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for _ in $(seq 100); do
            local alive=0
            for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            [ $alive = 0 ] && break
            sleep 0.1
        done
        for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
        wait 2>/dev/null || true
    fi
    [ $status = 0 ] || say "failed (exit status $status); logs in $LOGS"
    exit $status
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

market() { "$PYTHON" -m cpushare.market --db "$DB" "$@"; }

rm -rf "$RUN" "$LOGS" "$OUT/study"
mkdir -p "$RUN" "$LOGS"

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "market on 127.0.0.1:$PORT, state in $RUN"
market init --listen "127.0.0.1:$PORT" >"$LOGS/init.log"
"$PYTHON" -m cpushare.market --db "$DB" serve >"$LOGS/server.log" 2>&1 &
PIDS+=($!)
SERVER=$!

wait_for() {    # wait_for SECONDS WHAT COMMAND...
    local seconds=$1 what=$2; shift 2
    local end=$((SECONDS + seconds))
    until "$@"; do
        kill -0 "$SERVER" 2>/dev/null || die "the market server exited: $(tail -5 "$LOGS/server.log")"
        [ $SECONDS -lt $end ] || die "timed out after $seconds s waiting for $what"
        sleep 0.1
    done
}
listening() { "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.5).close()" 2>/dev/null; }
wait_for 30 "the market to listen on port $PORT" listening

for i in $(seq "$SELLERS"); do
    market account add "seller$i" >/dev/null
    market sell-order add "seller$i" --price "$ASK" --output "$RUN/seller$i.cpu" >/dev/null
    "$PYTHON" -m cpushare.daemon --foreground --no-dbus --cache-dir "$RUN/cache-seller$i" \
        "$RUN/seller$i.cpu" >"$LOGS/seller$i.log" 2>&1 &
    PIDS+=($!)
done
market account add lab --coins "$COINS" >/dev/null
market buy-order add lab --price "$BID" --redundancy 2 --max-cpu-seconds 5 \
    --output "$RUN/lab.buy" >/dev/null
connected() { grep -q "connected to" "$LOGS/seller$1.log" 2>/dev/null; }
for i in $(seq "$SELLERS"); do
    wait_for 30 "seller$i to connect (log: $LOGS/seller$i.log)" connected "$i"
done
say "$SELLERS seller daemons connected; buyer 'lab' has $COINS CPUCoins"

# In the background, so that a signal to this script interrupts `wait` at
# once and the trap stops the study with everything else.
"$PYTHON" "$ROOT/examples/floyd-steinberg/study.py" --order "$RUN/lab.buy" \
    --images "$IMAGES" --redundancy 2 --out "$OUT/study" &
STUDY_PID=$!
PIDS+=("$STUDY_PID")
STUDY=0
wait "$STUDY_PID" || STUDY=$?
unset 'PIDS[${#PIDS[@]}-1]'

echo
say "summary"
"$PYTHON" - "$OUT/study/summary.json" "$COINS" "$SELLERS" <<'EOF' || true
import json, sys
s = json.load(open(sys.argv[1]))
print(f"  images            {s['ok']} of {s['images']} ({len(s['failed'])} failed)")
k = s.get("images_per_task", 1)
print(f"  tasks             {s['tasks'] // s['redundancy']} of up to {k} images, each run by "
      f"{s['redundancy']} sellers: {s['tasks']} runs, {s['retries']} retries")
print(f"  wall time         {s['wall_seconds']:.1f} s")
print(f"  images per second {s['images_per_second']:.1f}")
c = s.get("native_check") or {}
if c:
    print(f"  native check      {c['identical']}/{c['checked']} sampled results bit-identical")
EOF
for i in $(seq "$SELLERS"); do
    printf '  earned            %s\n' "$(market balance "seller$i")"
done
LAB=$(market balance lab)
SPENT=$("$PYTHON" -c "import sys; print(f'{$COINS - float(sys.argv[1]):.3f}')" "${LAB##* }")
printf '  spent             lab %s (balance %s)\n' "$SPENT" "${LAB##* }"
if LEDGER=$(market ledger check 2>&1); then
    printf '  ledger check      %s\n' "$LEDGER"
else
    printf '  ledger check      FAILED: %s\n' "$LEDGER"
    STUDY=1
fi
printf '  results           %s\n' "$OUT/study/results.csv"
printf '  plot              %s\n' "$OUT/study/study.png"
exit $STUDY
