#!/usr/bin/env bash
# Graceful shutdown of the proxy example, tried as an operator would: 100 slow requests
# (3 s each at the origin) are under way when the proxy gets SIGTERM. Every one must
# finish with 200, a new connection after the signal must be refused, and the proxy must
# exit 0.
#
#   bash benches/proxy_shutdown.sh        (builds the release example when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
proxy=${PROXY:-target/release/examples/proxy}
[ -x "$proxy" ] || cargo build --release --example proxy
n=${REQUESTS:-100}

source benches/lib.sh

origin_port=$(free_port)
python3 benches/peers/origin.py "$origin_port" & pids+=($!)
until_true 10 curl -sf -o /dev/null "http://127.0.0.1:$origin_port/count/none"

proxy_port=$(free_port)
"$proxy" --listen "127.0.0.1:$proxy_port" --upstream "http://127.0.0.1:$origin_port" \
  --no-access-log ${PROXY_ARGS:-} >"$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
until_true 10 grep -q "listening on" "$work/proxy.log"

for i in $(seq 1 "$n"); do
  curl -s -o /dev/null -m 30 -w '%{http_code}' \
    "http://127.0.0.1:$proxy_port/slow/shutdown?ms=3000&i=$i" >"$work/r$i" 2>/dev/null &
  pids+=($!)
done
arrived() { [ "$(curl -s "http://127.0.0.1:$origin_port/count/shutdown")" = "$n" ]; }
until_true 20 arrived
echo "$n requests under way at the origin; sending SIGTERM"
kill -TERM "$proxy_pid"

refused() { ! curl -s -o /dev/null -m 1 "http://127.0.0.1:$proxy_port/obj/late"; }
until_true 5 refused
echo "new connections refused after the signal"

set +e
wait "$proxy_pid"
status=$?
set -e
for i in $(seq 1 "$n"); do wait "${pids[$((i + 1))]}" 2>/dev/null || true; done
ok=$(grep -lx 200 "$work"/r* 2>/dev/null | wc -l) || true
echo "proxy exit status: $status; requests answered 200: $ok of $n"
sed 's/^/  proxy: /' "$work/proxy.log"
if [ "$status" -ne 0 ] || [ "$ok" -ne "$n" ]; then
  echo "FAILED: graceful shutdown lost requests or did not exit 0" >&2
  exit 1
fi
echo "ok"
