#!/usr/bin/env bash
# The proxy example's requests, tried as clients send them: the cache keys on the Host
# the client used, so two sites an origin tells apart by X-Forwarded-Host stay apart;
# targeted cache-control fields (CDN-Cache-Control, Surrogate-Control) decide for the
# proxy; the upstream's redirects come back in the client's URL space, with and without a path
# prefix (`--upstream http://ORIGIN/base`); and a body sent without a length (chunked)
# up to --max-body-kb reaches an origin that reads only Content-Length whole; a body
# that stalls reaches the client as it arrives and is stored; a WebSocket goes through;
# an idle connection is closed, and so are one whose client stopped reading and a quiet
# WebSocket tunnel, and the connection cap holds, lowered to what the limit on open
# files allows.
#
#   bash benches/proxy_requests.sh     (builds the release example when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
proxy=${PROXY:-target/release/examples/proxy}
[ -x "$proxy" ] || cargo build --release --example proxy

source benches/lib.sh

origin_port=$(free_port)
python3 benches/peers/origin.py "$origin_port" & pids+=($!)
until_true 10 curl -sf -o /dev/null "http://127.0.0.1:$origin_port/count/none"
origin="127.0.0.1:$origin_port"

plain=$(free_port)
prefixed=$(free_port)
"$proxy" --listen "127.0.0.1:$plain" --upstream "http://$origin" --purge-token t \
  --max-body-kb 64 --no-access-log >"$work/plain.log" 2>&1 & pids+=($!)
"$proxy" --listen "127.0.0.1:$prefixed" --upstream "http://$origin/base" \
  --no-access-log >"$work/prefixed.log" 2>&1 & pids+=($!)
until_true 10 grep -q "listening on" "$work/plain.log"
until_true 10 grep -q "listening on" "$work/prefixed.log"

fail() { echo "FAILED: $*" >&2; exit 1; }

# Two sites on one origin that tells them apart by X-Forwarded-Host (set by a load
# balancer in front, with the site's Host): the cache keys on the Host the client used,
# so neither site is served the other's stored page.
site() { curl -s -H "Host: $1" -H "X-Forwarded-Host: $1" "http://127.0.0.1:$plain/site"; }
a=$(site a.test); b=$(site b.test); a_again=$(site a.test)
echo "two sites through one proxy: a.test got '$a' then '$a_again', b.test got '$b'"
[ "$b" = "site b.test" ] || fail "b.test was served '$b'"
[ "$a_again" = "site a.test" ] || fail "a.test was served '$a_again' the second time"

# A URL stored once, then dropped by a PURGE: the next request goes to the origin again.
curl -s -o /dev/null "http://127.0.0.1:$plain/obj/named"
curl -s -o /dev/null "http://127.0.0.1:$plain/obj/named"
stored=$(curl -s "http://$origin/count/named")
purged=$(curl -s -X PURGE -H "Authorization: Bearer t" "http://127.0.0.1:$plain/obj/named")
curl -s -o /dev/null "http://127.0.0.1:$plain/obj/named"
count=$(curl -s "http://$origin/count/named")
echo "one URL twice: origin requests $stored; '${purged%$'\n'}'; after it $count"
[ "$stored" = 1 ] || fail "two requests for one URL reached the origin $stored times"
[ "$count" = 2 ] || fail "after the PURGE the origin saw $count requests, not 2"

# Targeted cache-control fields: `CDN-Cache-Control: max-age=600` (and
# `Surrogate-Control: max-age=600`) beside `Cache-Control: max-age=0` is stored for
# 600 s; Surrogate-Control is removed before the response goes on, CDN-Cache-Control
# passed on; the origin is told the proxy's Surrogate-Capability.
for field in cdn surrogate; do
  headers=$(curl -s -D - -o "$work/targeted.body" "http://127.0.0.1:$plain/targeted/$field?$field=1")
  curl -s -o /dev/null "http://127.0.0.1:$plain/targeted/$field?$field=1"
  count=$(curl -s "http://$origin/count/$field")
  body=$(cat "$work/targeted.body")
  echo "targeted $field: origin requests $count; origin saw '$body'"
  [ "$count" = 1 ] || fail "$field: max-age=600 for this cache, but the origin saw $count requests"
  case "$body" in *Surrogate/1.0*) ;; *) fail "$field: the origin was not told Surrogate-Capability" ;; esac
  if [ "$field" = surrogate ]; then
    ! grep -qi '^surrogate-control' <<<"$headers" || fail "Surrogate-Control reached the client"
  else
    grep -qi '^cdn-cache-control: max-age=600' <<<"$headers" || fail "CDN-Cache-Control was not passed on"
  fi
done

# Redirects: the upstream's URLs (absolute or path-absolute, under the prefix) come back
# as the client's paths; a path the proxy cannot map is passed on unchanged.
location() { curl -s -o /dev/null -w '%{redirect_url}' "http://127.0.0.1:$1$2" | sed "s|^http://127.0.0.1:$1||"; }
check() {
  local got
  got=$(location "$1" "$2")
  echo "  GET $2 through port $1: Location $got"
  [ "$got" = "$3" ] || fail "GET $2 was redirected to '$got', not '$3'"
}
echo "redirects:"
check "$plain" /moved/doc /obj/doc
check "$plain" "/moved/doc?abs" /obj/doc
check "$prefixed" /moved/doc /obj/doc
check "$prefixed" "/moved/doc?abs" /obj/doc
# Followed, the redirect lands on the object (stored first under the upstream's URL).
body=$(curl -s -L "http://127.0.0.1:$prefixed/moved/doc?abs" | head -c 4)
[ "$body" = xxxx ] || fail "following the prefixed proxy's redirect gave '$body'"
# Bodies: with a length, and chunked below --max-body-kb (64 KiB here). One above the
# bound goes on chunked, which this origin does not read.
head -c 5000 /dev/zero >"$work/small"
post() { curl -s -X POST "$@" "http://127.0.0.1:$plain/echo"; }
with_length=$(post --data-binary @"$work/small")
chunked=$(post -H "Transfer-Encoding: chunked" --data-binary @"$work/small")
empty=$(post -H "Transfer-Encoding: chunked" --data-binary "")
echo "the origin read: 5,000 bytes with a length: $with_length; chunked: $chunked; empty and chunked: $empty"
[ "$with_length" = "length 5000" ] || fail "a body with a length arrived as '$with_length'"
[ "$chunked" = "length 5000" ] || fail "a chunked body arrived as '$chunked'"
[ "$empty" = "length 0" ] || fail "an empty chunked body arrived as '$empty'"

# A body that stalls on the way (its second half waits for GET /release): the client has
# the first half before the origin sends the second, and the whole is stored.
curl -s -o "$work/trickle" "http://127.0.0.1:$plain/trickle/t1" & trickle=$!
half_arrived() { [ "$(stat -c %s "$work/trickle" 2>/dev/null || echo 0)" -ge 8192 ]; }
until_true 10 half_arrived || fail "the first half did not reach the client before the rest was sent"
curl -s -o /dev/null "http://$origin/release/t1"
wait "$trickle"
size=$(stat -c %s "$work/trickle")
curl -s -o /dev/null "http://127.0.0.1:$plain/trickle/t1"
count=$(curl -s "http://$origin/count/t1")
echo "a stalling body: the first half arrived before the rest was sent; $size bytes; origin requests after a second GET: $count"
[ "$size" = 16384 ] || fail "the stalling body arrived with $size bytes"
[ "$count" = 1 ] || fail "the stalling body was not stored ($count origin requests)"

# A WebSocket through the proxy: the handshake reaches the origin, its 101 comes back
# with the right Sec-WebSocket-Accept, and messages go both ways.
cat >"$work/ws.py" <<'PY'
# usage: ws.py PORT GAP_SECONDS [--until-closed] WORD...
import base64, hashlib, os, select, socket, sys, time
port, gap = int(sys.argv[1]), float(sys.argv[2])
until_closed = sys.argv[3] == "--until-closed"
words = sys.argv[4:] if until_closed else sys.argv[3:]
conn = socket.create_connection(("127.0.0.1", port), timeout=10)
key = base64.b64encode(os.urandom(16)).decode()
conn.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
              f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
              "Sec-WebSocket-Version: 13\r\n\r\n").encode())
def exactly(n):
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            sys.exit("closed")
        data += more
    return data
head = b""
while not head.endswith(b"\r\n\r\n"):
    head += exactly(1)
status = head.split(b"\r\n")[0].decode().split(" ", 1)[1]
accept = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
fields = {}
for line in head.split(b"\r\n")[1:]:
    name, _, value = line.partition(b":")
    fields[name.strip().lower()] = value.strip()
if fields.get(b"sec-websocket-accept") != accept:
    sys.exit(f"no matching Sec-WebSocket-Accept: {status}")
got = []
for i, word in enumerate(words):
    if i:
        time.sleep(gap)
    mask = os.urandom(4)
    data = word.encode()
    conn.sendall(bytes([0x81, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
    first = exactly(2)
    got.append(exactly(first[1] & 0x7F).decode())
end = ""
if until_closed:
    if not select.select([conn], [], [], 15)[0]:
        sys.exit(f"{status}: {' '.join(got)}, and still open when quiet")
    end = ", then closed when quiet" if not conn.recv(1) else ", then data"
print(f"{status}: {' '.join(got)}{end}")
PY
ws=$(python3 "$work/ws.py" "$plain" 0 hello again) || fail "the WebSocket client failed: $ws"
echo "a WebSocket through the proxy: $ws"
[ "$ws" = "101 Switching Protocols: hello again" ] || fail "the WebSocket gave '$ws'"

# Connections: with one allowed at a time and a 1 s idle timeout, a client that connects
# and sends nothing is closed, and a request that came after it is answered only then.
capped=$(free_port)
"$proxy" --listen "127.0.0.1:$capped" --upstream "http://$origin" --max-connections 1 \
  --idle-timeout-secs 1 --no-access-log >"$work/capped.log" 2>&1 & pids+=($!)
until_true 10 grep -q "listening on" "$work/capped.log"
capped_result=$(python3 - "$capped" <<'PY'
import select, socket, sys
port = int(sys.argv[1])
idle = socket.create_connection(("127.0.0.1", port), timeout=10)
second = socket.create_connection(("127.0.0.1", port), timeout=10)
second.sendall(b"GET /obj/capped HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
events, waiting = [], [idle, second]
while waiting:
    ready, _, _ = select.select(waiting, [], [], 10)
    if not ready:
        sys.exit(f"nothing happened after {events}")
    # Both at once cannot tell the order; the idle one first then (a request answered
    # while the idle connection held the only slot would come a second earlier).
    for conn in sorted(ready, key=lambda c: c is not idle):
        data = conn.recv(65536)
        if conn is idle:
            events.append("the idle one closed" if not data else "the idle one got data")
            waiting.remove(idle)
        elif data.startswith(b"HTTP/1.1 "):
            events.append("the request answered " + data.split(b" ")[1].decode())
        elif not data:
            waiting.remove(second)
print(", then ".join(events))
PY
) || fail "the connection check failed: $capped_result"
echo "one connection allowed, an idle one open, a request sent: $capped_result"
[ "$capped_result" = "the idle one closed, then the request answered 200" ] \
  || fail "with one connection allowed and an idle one open: $capped_result"

# A response still being sent is not idle: a body whose second half comes 2.5 s after
# the first (over twice the 1 s idle timeout) arrives whole.
(sleep 2.5; curl -s -o /dev/null "http://$origin/release/t2") &
long=$(curl -s -o /dev/null -w '%{size_download}' "http://127.0.0.1:$capped/trickle/t2" || true)
echo "a body sent over 2.5 s through a proxy with a 1 s idle timeout: $long bytes"
[ "$long" = 16384 ] || fail "the body sent over 2.5 s arrived with $long bytes"

# A WebSocket tunnel through a proxy with a 1 s idle timeout stays open while messages
# go every 0.3 s (2.1 s in all), and is closed once it has been quiet for the timeout.
quiet_ws=$(python3 "$work/ws.py" "$capped" 0.3 --until-closed a b c d e f g h) \
  || fail "the quiet WebSocket check failed: $quiet_ws"
echo "a WebSocket through a proxy with a 1 s idle timeout: $quiet_ws"
[ "$quiet_ws" = "101 Switching Protocols: a b c d e f g h, then closed when quiet" ] \
  || fail "the WebSocket through a 1 s idle timeout gave '$quiet_ws'"

# A client that stops reading a download would hold the only connection slot for ever:
# it is closed once it has taken nothing for the idle timeout, and a request sent after
# it is answered then.
stalled_result=$(python3 - "$capped" <<'PY'
import select, socket, sys
port = int(sys.argv[1])
size = 64 * 1024 * 1024
stalled = socket.socket()
stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
stalled.settimeout(10)
stalled.connect(("127.0.0.1", port))
stalled.sendall(b"GET /big/stalled?mb=64 HTTP/1.1\r\nHost: x\r\n\r\n")
got = len(stalled.recv(100))
second = socket.create_connection(("127.0.0.1", port), timeout=10)
second.sendall(b"GET /obj/after-stall HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
if not select.select([second], [], [], 15)[0]:
    sys.exit("the request after the stalled download was not answered")
answer = "the request answered " + second.recv(65536).split(b" ")[1].decode()
try:
    while True:
        data = stalled.recv(1 << 20)
        if not data:
            break
        got += len(data)
except ConnectionResetError:
    pass
print(answer + (", the stalled download cut short" if got < size else ", the stalled download whole"))
PY
) || fail "the stalled-client check failed: $stalled_result"
echo "one connection allowed, a client that stopped reading, a request sent: $stalled_result"
[ "$stalled_result" = "the request answered 200, the stalled download cut short" ] \
  || fail "with one connection allowed and a client that stopped reading: $stalled_result"
# Under a limit of 200 open files and with no --max-connections, the proxy caps its
# connections where descriptors do not run out: 300 clients at once each wait their turn
# and get their slow (300 ms) page, none a 502 for want of a descriptor.
few_files=$(free_port)
(ulimit -n 200; exec "$proxy" --listen "127.0.0.1:$few_files" --upstream "http://$origin" \
  --no-access-log) >"$work/few_files.log" 2>&1 & pids+=($!)
until_true 10 grep -q "listening on" "$work/few_files.log"
crowd=$(python3 - "$few_files" 300 <<'PY'
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
statuses, lock = [], threading.Lock()
def one(i):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(f"GET /slow/crowd{i}?ms=300 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while more := s.recv(65536):
            data += more
        status = data.split(b" ")[1].decode() if data else "closed"
    except OSError as e:
        status = type(e).__name__
    with lock:
        statuses.append(status)
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(" ".join(f"{statuses.count(k)} x {k}" for k in sorted(set(statuses))))
PY
)
echo "300 clients at once through a proxy allowed 200 open files: $crowd ($(grep -o 'at most [0-9]* client connections' "$work/few_files.log"))"
[ "$crowd" = "300 x 200" ] || fail "300 clients through a proxy allowed 200 open files got: $crowd"
echo "ok"
