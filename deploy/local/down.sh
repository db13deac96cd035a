#!/usr/bin/env bash
# Stops the local cluster started by up.sh (SIGTERM, then waits). Data is kept.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
for i in 1 2 3 4 5; do
  pidfile="$RUN_DIR/node$i.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { echo "node $i did not stop; killing" >&2; kill -KILL "$pid"; }
    echo "stopped node $i"
  fi
  rm -f "$pidfile"
done
