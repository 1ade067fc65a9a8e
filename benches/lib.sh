# Helpers the proxy scripts share (sourced, not run): a scratch directory and background
# processes cleaned up on exit, free ports, and waiting for a condition.
#
#   source benches/lib.sh     (sets $work; add background pids to the pids array)

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] && cp -r "$work" /tmp/proxy-script-logs
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Polls `$@` every 0.1 s until it succeeds, for at most $timeout seconds.
until_true() {
  local timeout=$1; shift
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then echo "timed out waiting for: $*" >&2; return 1; fi
    sleep 0.1
  done
}
