#!/usr/bin/env bash
# The proxy example beside nginx (proxy_cache, proxy_cache_lock) and Varnish, in front of
# the same origin (benches/peers/origin.py), in one run:
#
# - hits: wrk, 2 threads, 64 connections, one stored 1 KiB object, $DURATION seconds per
#   proxy per round, $ROUNDS rounds interleaved; the table gives each proxy's median
#   requests per second over the rounds, and p50/p99 latency of that median round;
# - a cold burst: 1,000 concurrent requests, one connection each, for one URL nobody has
#   stored, whose origin answer takes 500 ms; the table gives how many reached the origin;
# - a stalling body: 16 KiB whose second half the origin sends 1 s after the first
#   (benches/peers/stall.py); the table gives when its first byte and the whole of it
#   reached the client, and how many origin requests a second GET made (0: it was stored).
#
#   bash benches/peers/run.sh             (installs nginx, varnish and wrk with apt-get
#                                         when missing; builds the release proxy example)
#
# Prints a Markdown table. ROUNDS (default 3), DURATION (default 10) and BURST (default
# 1000) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${ROUNDS:-3}
duration=${DURATION:-10}
burst=${BURST:-1000}

missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v varnishd >/dev/null || [ -x /usr/sbin/varnishd ] || missing+=(varnish)
command -v wrk >/dev/null || missing+=(wrk)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
proxy=target/release/examples/proxy
[ -x "$proxy" ] || cargo build --release --example proxy
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  [ -f "$work/varnish.pid" ] && kill "$(cat "$work/varnish.pid")" 2>/dev/null || true
  sleep 0.5
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
until_up() {
  local deadline=$((SECONDS + 15))
  until curl -s -o /dev/null "http://127.0.0.1:$1/count/none"; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "port $1 did not come up" >&2; exit 1; }
    sleep 0.1
  done
}

origin=$(free_port)
python3 benches/peers/origin.py "$origin" & pids+=($!)
until_up "$origin"

# towerguard: the proxy example, its defaults, no access log (the peers log nothing either).
tg=$(free_port)
"$proxy" --listen "127.0.0.1:$tg" --upstream "http://127.0.0.1:$origin" --no-access-log \
  >"$work/towerguard.log" 2>&1 & pids+=($!)
until_up "$tg"

# nginx: two workers (one per core), proxy_cache with proxy_cache_lock.
ng=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx/error.log warn;
$( [ "$(id -u)" -eq 0 ] && echo "user root;" )
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  proxy_cache_path $work/nginx/cache levels=1:2 keys_zone=peers:16m max_size=256m;
  upstream origin { server 127.0.0.1:$origin; keepalive 64; }
  server {
    listen 127.0.0.1:$ng;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache peers;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 10s;
    }
  }
}
CONF
nginx -c "$work/nginx.conf" -p "$work/nginx" 2>>"$work/nginx/error.log"
until_up "$ng"

# Varnish: its defaults (request coalescing is built in), 256 MiB of memory.
va=$(free_port)
mkdir -p "$work/varnish"
varnishd -a "127.0.0.1:$va" -b "127.0.0.1:$origin" -s malloc,256m -n "$work/varnish" \
  -P "$work/varnish.pid" >"$work/varnish.log" 2>&1
until_up "$va"

names=(towerguard nginx varnish)
ports=("$tg" "$ng" "$va")

# wrk's latency values come with units; in milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000;
    printf "%.2f", n }'
}

declare -A rps p50 p99
for i in 0 1 2; do
  curl -s -o /dev/null "http://127.0.0.1:${ports[$i]}/obj/hot"
  curl -s -o /dev/null "http://127.0.0.1:${ports[$i]}/obj/hot"
done
for round in $(seq 1 "$rounds"); do
  for i in 0 1 2; do
    out=$(wrk -t2 -c64 -d"${duration}s" --latency "http://127.0.0.1:${ports[$i]}/obj/hot")
    r=$(awk '/^Requests\/sec:/ {printf "%d", $2}' <<<"$out")
    l50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    l99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    rps[${names[$i]},$round]=$r
    p50[${names[$i]},$round]=$(to_ms "$l50")
    p99[${names[$i]},$round]=$(to_ms "$l99")
    echo "round $round ${names[$i]}: $r req/s, p50 $(to_ms "$l50") ms, p99 $(to_ms "$l99") ms" >&2
  done
done

hits_before=$(curl -s "http://127.0.0.1:$origin/count/hot")
echo >&2
echo "origin requests for /obj/hot during the hit rounds (after warm-up): $((hits_before - 3))" >&2

declare -A cold statuses
for i in 0 1 2; do
  name="cold-${names[$i]}"
  statuses[${names[$i]}]=$(python3 benches/peers/burst.py 127.0.0.1 "${ports[$i]}" "/slow/$name?ms=500" "$burst")
  cold[${names[$i]}]=$(curl -s "http://127.0.0.1:$origin/count/$name")
  echo "cold burst ${names[$i]}: ${statuses[${names[$i]}]}, origin requests ${cold[${names[$i]}]}" >&2
done

declare -A stall stall_again
for i in 0 1 2; do
  name="stall-${names[$i]}"
  stall[${names[$i]}]=$(python3 benches/peers/stall.py 127.0.0.1 "${ports[$i]}" "$origin" "$name")
  before=$(curl -s "http://127.0.0.1:$origin/count/$name")
  curl -s -o /dev/null "http://127.0.0.1:${ports[$i]}/trickle/$name"
  stall_again[${names[$i]}]=$(($(curl -s "http://127.0.0.1:$origin/count/$name") - before))
  echo "stalling body ${names[$i]}: ${stall[${names[$i]}]}, origin requests for a second GET: ${stall_again[${names[$i]}]}" >&2
done

median_round() { # name -> the round whose rps is the median
  local name=$1
  for round in $(seq 1 "$rounds"); do echo "${rps[$name,$round]} $round"; done |
    sort -n | awk -v m=$(((rounds + 1) / 2)) 'NR == m {print $2}'
}

echo
echo "$(date -u +%Y-%m-%d), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
echo "$(nginx -v 2>&1 | sed 's/.*: //'), $(varnishd -V 2>&1 | head -1 | grep -o 'varnish-[0-9.]*'), wrk -t2 -c64 -d${duration}s, $rounds rounds"
echo
echo "| proxy | hits/s (median) | hits/s (all rounds) | p50 ms | p99 ms | origin requests, $burst cold concurrent | answers | stalling body (second half after 1 s) | a second GET's origin requests |"
echo "|---|---:|---|---:|---:|---:|---|---|---:|"
for name in "${names[@]}"; do
  m=$(median_round "$name")
  all=$(for round in $(seq 1 "$rounds"); do printf '%s ' "${rps[$name,$round]}"; done)
  echo "| $name | ${rps[$name,$m]} | ${all% } | ${p50[$name,$m]} | ${p99[$name,$m]} | ${cold[$name]} | ${statuses[$name]} | ${stall[$name]} | ${stall_again[$name]} |"
done
