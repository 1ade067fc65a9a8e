#!/usr/bin/env bash
# Three proxies sharing one cache through Redis, tried as an operator would run a fleet:
# a redis-server of its own, the origin of benches/peers, and three proxy examples with
# `--redis`. A cold burst spread over the three must reach the origin once; a POST
# through one must invalidate the URL on all three, and so must a PURGE of the URL or of
# a tag it carries (and a tag PURGE only what carries the tag).
#
#   bash benches/proxy_fleet.sh     (builds the release example with the redis feature
#                                    when missing; PROXY=path uses another build)
set -euo pipefail
cd "$(dirname "$0")/.."
proxy=${PROXY:-target/release/examples/proxy}
[ -x "$proxy" ] || cargo build --release --features redis --example proxy
per_proxy=${REQUESTS:-333}

source benches/lib.sh

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" >"$work/redis.log" 2>&1 & pids+=($!)
until_true 10 grep -q "Ready to accept connections" "$work/redis.log"

origin_port=$(free_port)
python3 benches/peers/origin.py "$origin_port" & pids+=($!)
until_true 10 curl -sf -o /dev/null "http://127.0.0.1:$origin_port/count/none"

ports=()
for i in 0 1 2; do
  port=$(free_port)
  "$proxy" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$origin_port" \
    --redis "redis://127.0.0.1:$redis_port/" --purge-token fleet-token --no-access-log >"$work/proxy$i.log" 2>&1 &
  pids+=($!)
  ports+=("$port")
done
for i in 0 1 2; do until_true 10 grep -q "listening on" "$work/proxy$i.log"; done
echo "three proxies on ports ${ports[*]}, one Redis on $redis_port"

# A cold burst: $per_proxy concurrent requests on each proxy for one slow URL (the same
# Host on all three, as behind one load balancer).
bursts=()
for i in 0 1 2; do
  python3 benches/peers/burst.py 127.0.0.1 "${ports[$i]}" "/slow/cold?ms=500" "$per_proxy" \
    fleet.test >"$work/burst$i" &
  bursts+=($!)
done
for pid in "${bursts[@]}"; do wait "$pid" || { echo "FAILED: a burst failed" >&2; exit 1; }; done
origin=$(curl -s "http://127.0.0.1:$origin_port/count/cold")
echo "cold burst of $((3 * per_proxy)) over three proxies: $(cat "$work"/burst* | tr '\n' ' ')-> origin requests: $origin"
[ "$origin" = 1 ] || { echo "FAILED: the fleet went to the origin $origin times" >&2; exit 1; }

# A POST through one proxy invalidates the URL on all three.
# Behind one load balancer, every proxy sees the same Host.
get() { curl -s -H "Host: fleet.test" "http://127.0.0.1:${ports[$1]}/obj/doc"; }
curl -s -o /dev/null -X POST "http://127.0.0.1:$origin_port/obj/doc"  # version 2 at the origin
for i in 0 1 2; do get "$i" >/dev/null; done
before=$(for i in 0 1 2; do get "$i"; echo; done | sort -u)
echo "before the POST, every proxy serves: $before (origin requests: $(curl -s "http://127.0.0.1:$origin_port/count/doc"))"
status=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: fleet.test" -X POST \
  "http://127.0.0.1:${ports[1]}/obj/doc")
echo "POST through proxy 1: $status"
stale=0
for i in 0 1 2; do
  body=$(get "$i")
  if [ "$body" != "doc version 3" ]; then
    stale=$((stale + 1))
    echo "  proxy $i served '$body' right after the POST" >&2
  fi
done
echo "after the POST: $(for i in 0 1 2; do get "$i"; echo; done | sort -u) (origin requests: $(curl -s "http://127.0.0.1:$origin_port/count/doc"))"
[ "$stale" = 0 ] || { echo "FAILED: $stale proxies served the old version after the POST" >&2; exit 1; }

# A change the proxies cannot see (made at the origin directly), then a PURGE through
# one proxy: without the token it is refused, with it every proxy drops the URL.
curl -s -o /dev/null -X POST "http://127.0.0.1:$origin_port/obj/doc"  # version 4 at the origin
purge() { curl -s -o /dev/null -w '%{http_code}' -H "Host: fleet.test" -X PURGE "$@" \
  "http://127.0.0.1:${ports[2]}/obj/doc"; }
refused=$(purge)
[ "$refused" = 401 ] || { echo "FAILED: a PURGE without the token got $refused" >&2; exit 1; }
kept=$(for i in 0 1 2; do get "$i"; echo; done | sort -u)
[ "$kept" = "doc version 3" ] || { echo "FAILED: after a refused PURGE the fleet served '$kept'" >&2; exit 1; }
purged=$(purge -H "Authorization: Bearer fleet-token")
echo "PURGE through proxy 2: without the token $refused, with it $purged"
after=$(for i in 0 1 2; do get "$i"; echo; done | sort -u)
echo "after the PURGE: $after"
[ "$after" = "doc version 4" ] || { echo "FAILED: after the PURGE the fleet served '$after'" >&2; exit 1; }

# A PURGE by tag through proxy 0 (the origin tags /obj/NAME with NAME): every proxy drops
# the URL tagged `doc` and keeps `/obj/other`.
getp() { curl -s -H "Host: fleet.test" "http://127.0.0.1:${ports[$1]}/obj/$2"; }
for i in 0 1 2; do getp "$i" other >/dev/null; done
others=$(curl -s "http://127.0.0.1:$origin_port/count/other")
curl -s -o /dev/null -X POST "http://127.0.0.1:$origin_port/obj/doc"   # version 5
curl -s -o /dev/null -X POST "http://127.0.0.1:$origin_port/obj/other" # version 2
tagged=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: fleet.test" -X PURGE \
  -H "Authorization: Bearer fleet-token" -H "Cache-Tag: doc" "http://127.0.0.1:${ports[0]}/")
after=$(for i in 0 1 2; do get "$i"; echo; done | sort -u)
kept=$(for i in 0 1 2; do getp "$i" other; echo; done | sort -u)
echo "PURGE of tag doc through proxy 0: $tagged; then doc: $after; other: $(head -c 8 <<<"$kept")... (origin requests for other: $others then $(curl -s "http://127.0.0.1:$origin_port/count/other"))"
[ "$tagged" = 200 ] || { echo "FAILED: the tag PURGE got $tagged" >&2; exit 1; }
[ "$after" = "doc version 5" ] || { echo "FAILED: after the tag PURGE the fleet served '$after'" >&2; exit 1; }
[ "$kept" != "other version 2" ] || { echo "FAILED: the tag PURGE dropped an untagged URL" >&2; exit 1; }

# A URL whose responses are never stored (300 ms, no-store), three concurrent requests on
# each proxy, twice: the first burst's proxies wait for one another's lease only once
# (the holder marks the URL in Redis), the second goes to the origin at once everywhere.
dyn_burst() {
  for i in 0 1 2; do
    for _ in 1 2 3; do
      curl -s -o /dev/null -H "Host: fleet.test" -w "%{http_code}:%{time_total} " \
        "http://127.0.0.1:${ports[$i]}/slow/dyn?ms=300&cc=no-store" &
    done
  done
  wait
}
first=$(dyn_burst)
second=$(dyn_burst)
echo "no-store URL, 9 requests over three proxies (status:seconds): first burst $first; second $second (origin requests: $(curl -s "http://127.0.0.1:$origin_port/count/dyn"))"
for answer in $first $second; do
  [ "${answer%%:*}" = 200 ] || { echo "FAILED: a no-store request got ${answer%%:*}" >&2; exit 1; }
done
echo "ok"
