#!/usr/bin/env bash
# Starts node 4 or 5 of the local cluster (deploy/local/up.sh) with a [join]
# setting, in role spare (default), dr or standby: it waits, serving nothing,
# until two operators add it (the command is printed). Usage: join.sh 4 [spare]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
i=${1:-4}
role=${2:-spare}
case "$i" in 4 | 5) ;; *) echo "usage: $0 4|5 [spare|dr|standby|backup]" >&2; exit 2 ;; esac
CERTS="$RUN_DIR/certs"
if [ ! -f "$CERTS/node-$i.pem" ]; then
  echo "error: no certificate for node $i in $CERTS (made before nodes 4 and 5 had one);" \
    "start over with MAILVAULT_FRESH=1 deploy/local/up.sh" >&2
  exit 1
fi
if [ -f "$RUN_DIR/node$i.pid" ] && kill -0 "$(cat "$RUN_DIR/node$i.pid")" 2>/dev/null; then
  echo "node $i already running" >&2
else
  [ -f "$RUN_DIR/node$i.toml" ] || write_joining_config "$RUN_DIR" 0 "$i" "$RUN_DIR/master.key" "$CERTS" "$role"
  start_node "$RUN_DIR" "$i"
fi
for _ in $(seq 1 30); do
  curl -fs "http://127.0.0.1:730$i/healthz" >/dev/null 2>&1 && break
  sleep 1
done
cat <<MSG
node $i runs ($role, log $RUN_DIR/node$i.log) and waits to be added. As admin:
  mailvault-admin op propose --reason "add node $i" add-node $i --raft-addr 127.0.0.1:720$i
then, as admin2: mailvault-admin op show ID, and mailvault-admin op approve ID --yes --plan-hash HASH.
Restarted later (after down.sh), it is started again by this script with the same config.
MSG
