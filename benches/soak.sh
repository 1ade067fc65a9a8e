#!/usr/bin/env bash
# Soak: the release proxy for $DURATION seconds (default 600) under steady load from wrk
# against benches/peers/hostile_origin.py, which resets connections, stalls past the
# proxy's timeout, cuts bodies short, answers 5xx, sends 200 response fields or one of
# 600 KiB, and bodies above and below the store's bound with and without Content-Length
# (benches/wrk/hostile.lua has the mix; 1% of requests carry a 100 KiB header). Every
# $INTERVAL seconds (default 30) it prints the proxy's RSS, its open descriptors (once the
# interval's client connections have closed; "upstream" counts the pooled connections to
# the origin among them) and the interval's status mix; at the end, how far RSS and
# descriptors strayed from their median after warm-up (the first 60 s) and whether every
# request was answered.
#
#   bash benches/soak.sh                      (10 minutes)
#   DURATION=60 INTERVAL=10 bash benches/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
proxy=${PROXY:-target/release/examples/proxy}
[ -x "$proxy" ] || cargo build --release --example proxy
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
duration=${DURATION:-600}
interval=${INTERVAL:-30}
warmup=${WARMUP:-60}

source benches/lib.sh
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
# Established TCP connections whose local (or remote) port is $1.
connections_on() { ss -Htn state established "( sport = :$1 )" | wc -l; }
connections_to() { ss -Htn state established "( dport = :$1 )" | wc -l; }

origin_port=$(free_port)
python3 benches/peers/hostile_origin.py "$origin_port" >"$work/origin.log" 2>&1 & pids+=($!)
until_true 10 curl -sf -o /dev/null "http://127.0.0.1:$origin_port/ok/ready"
port=$(free_port)
"$proxy" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$origin_port" \
  --cache-capacity-mb 16 --max-body-kb 1024 --timeout-ms 1000 --limit 64 --retry 1 \
  --stale-on-error-secs 30 --max-header-kb 64 --no-access-log ${PROXY_ARGS:-} \
  >"$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
until_true 10 grep -q "listening on" "$work/proxy.log"
curl -s -o /dev/null "http://127.0.0.1:$port/ok/warm"
start_rss=$(rss_kb "$proxy_pid")
start_fds=$(fds "$proxy_pid")
echo "proxy: cache 16 MiB, bodies up to 1 MiB stored, timeout 1 s, limit 64, 1 retry"
echo "start: RSS $((start_rss / 1024)) MiB, $start_fds descriptors"

sent=0 answered=0 errors=0
samples=()
for ((t = interval; t <= duration; t += interval)); do
  wrk -t2 -c32 -d"${interval}s" --timeout 10s -s benches/wrk/hostile.lua \
    "http://127.0.0.1:$port/" >"$work/wrk.txt" 2>&1 || true
  kill -0 "$proxy_pid" 2>/dev/null || { echo "the proxy exited" >&2; cat "$work/proxy.log" >&2; exit 1; }
  until_true 10 [ "$(connections_on "$port")" -eq 0 ]
  rss=$(rss_kb "$proxy_pid")
  n=$(fds "$proxy_pid")
  upstream=$(connections_to "$origin_port")
  read -r s a c r w o < <(awk '/^sent/ {gsub(/;/, ""); print $2, $4, $8, $10, $12, $14}' "$work/wrk.txt")
  sent=$((sent + s)) answered=$((answered + a)) errors=$((errors + c + r + w + o))
  [ "$t" -gt "$warmup" ] && samples+=("$rss $n $upstream")
  printf '%4ds: RSS %3d MiB, %3d descriptors (upstream %2d); %s; %s\n' "$t" $((rss / 1024)) "$n" \
    "$upstream" "$(grep '^status' "$work/wrk.txt")" "$(grep '^sent' "$work/wrk.txt")"
done

if grep -qi "panick" "$work/proxy.log"; then
  echo "the proxy logged a panic:" >&2
  grep -i "panick" "$work/proxy.log" | head >&2
  exit 1
fi
printf '%s\n' "${samples[@]}" | python3 -c "
import statistics, sys
rows = [tuple(map(int, line.split())) for line in sys.stdin if line.strip()]
rss = [r for r, _, _ in rows]
own = [f - u for _, f, u in rows]
pool = [u for _, _, u in rows]
def strayed(xs):
    m = statistics.median(xs)
    return max(abs(x - m) for x in xs) / m * 100
print(f'after warm-up ({len(rows)} samples): RSS {min(rss) / 1024:.1f}-{max(rss) / 1024:.1f} MiB, '
      f'median {statistics.median(rss) / 1024:.1f}, at most {strayed(rss):.1f}% from it')
print(f'descriptors other than pooled upstream connections: {min(own)}-{max(own)}, '
      f'at most {strayed(own):.1f}% from the median; pooled upstream: {min(pool)}-{max(pool)}')
print(f'end: RSS {rss[-1] / 1024:.1f} MiB, {own[-1] + pool[-1]} descriptors')
"
# wrk stops each interval with up to one request per connection under way, uncounted.
echo "requests: sent $sent, answered $answered, under way when an interval ended $((sent - answered)) (at most 32 per interval), socket errors $errors; no panic"
[ "$errors" -eq 0 ] || { echo "some requests were not answered" >&2; exit 1; }
