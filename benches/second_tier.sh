#!/usr/bin/env bash
# The second tier's bench built twice, without and with the redis feature, run in turn
# three times each, so the first-tier hit cost with the feature off and on comes from the
# same session.
#
#   bash benches/second_tier.sh
set -euo pipefail
cd "$(dirname "$0")/.."
build() {
  cargo bench --bench second_tier --no-run --message-format=json "$@" 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "second_tier" and m.get("executable"):
        print(m["executable"])'
}
off=$(build)
on=$(build --features redis)
for round in 1 2 3; do
  echo "== round $round, feature off"
  "$off"
  echo "== round $round, feature on"
  "$on"
done
