#!/usr/bin/env bash
# The proxy example's requests, tried as clients send them: the cache keys on the Host
# the client used, so two sites an origin tells apart by X-Forwarded-Host stay apart;
# the upstream's redirects come back in the client's URL space, with and without a path
# prefix (`--upstream http://ORIGIN/base`); and a body sent without a length (chunked)
# up to --max-body-kb reaches an origin that reads only Content-Length whole.
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
echo "ok"
