#!/usr/bin/env bash
# The proxy example's memory under a flood of distinct keys, against its configured cache
# capacity: wrk asks for URLs never asked for before (1 KiB cacheable responses from the
# origin of benches/peers) for $SECONDS_RUN seconds; the proxy's RSS is sampled every 5 s.
# Reports the idle baseline, the last RSS, and (RSS - baseline) / capacity.
#
#   CAPACITY_MB=4 SECONDS_RUN=60 bash benches/memory_flood.sh
set -euo pipefail
cd "$(dirname "$0")/.."
proxy=${PROXY:-target/release/examples/proxy}
[ -x "$proxy" ] || cargo build --release --example proxy
capacity_mb=${CAPACITY_MB:-4}
seconds=${SECONDS_RUN:-60}

source benches/lib.sh
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

origin_port=$(free_port)
python3 benches/peers/origin.py "$origin_port" & pids+=($!)
until_true 10 curl -sf -o /dev/null "http://127.0.0.1:$origin_port/count/none"
port=$(free_port)
"$proxy" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$origin_port" \
  --cache-capacity-mb "$capacity_mb" --no-access-log ${PROXY_ARGS:-} >"$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
until_true 10 grep -q "listening on" "$work/proxy.log"
# Warm the proxy's code paths with one key, then take the idle baseline.
curl -s -o /dev/null "http://127.0.0.1:$port/obj/warm"
baseline=$(rss_kb "$proxy_pid")
echo "capacity ${capacity_mb} MiB; idle RSS $((baseline / 1024)) MiB"

wrk -t2 -c32 -d"${seconds}s" -s benches/wrk/distinct.lua "http://127.0.0.1:$port/" \
  >"$work/wrk.txt" 2>&1 & pids+=($!)
wrk_pid=$!
for ((t = 5; t <= seconds; t += 5)); do
  sleep 5
  rss=$(rss_kb "$proxy_pid")
  echo "  ${t}s: RSS $((rss / 1024)) MiB"
done
wait "$wrk_pid" || true
rss=$(rss_kb "$proxy_pid")
grep -E "requests in|Non-2xx" "$work/wrk.txt" | sed 's/^ */  wrk: /'
python3 -c "
b, r, c = $baseline, $rss, $capacity_mb * 1024
print(f'final RSS {r // 1024} MiB; above idle {(r - b) / 1024:.1f} MiB = {(r - b) / c:.2f} x the capacity')"
