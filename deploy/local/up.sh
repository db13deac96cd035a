#!/usr/bin/env bash
# Builds mailvault, creates a development master key, starts a 3-node cluster
# on 127.0.0.1 (active, standby, backup), waits until it is healthy and prints
# how to reach it. Stop it with deploy/local/down.sh. Re-running restarts the
# same cluster with its data; MAILVAULT_FRESH=1 wipes it first.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ensure_prerequisites
echo "building (the first build compiles RocksDB: 10-25 minutes on 2 cores)..." >&2
(cd "$ROOT" && cargo build --workspace --bins --quiet)

if [ "${MAILVAULT_FRESH:-0}" = 1 ]; then
  "$ROOT/deploy/local/down.sh" >/dev/null 2>&1 || true
  rm -rf "$RUN_DIR"
fi
mkdir -p "$RUN_DIR"
KEY="$RUN_DIR/master.key"
if [ ! -f "$KEY" ]; then
  (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$KEY")
  echo "created development master key $KEY (mode 0600)" >&2
fi

CERTS="$RUN_DIR/certs"
if [ ! -f "$CERTS/ca.pem" ]; then
  "$BIN_DIR/mailvault-admin" dev-certs --out "$CERTS" \
    --node 1=127.0.0.1 --node 2=127.0.0.1 --node 3=127.0.0.1 --node 4=127.0.0.1 --node 5=127.0.0.1 \
    --client admin --client admin2 --client auditor --client frontend --client reader >&2
fi
if [ ! -f "$CERTS/client-admin2.pem" ]; then
  echo "warning: $CERTS predates the second operator (admin2), who approves two-person" \
    "operations; start over with MAILVAULT_FRESH=1 deploy/local/up.sh" >&2
fi

for i in 1 2 3; do
  if [ -f "$RUN_DIR/node$i.pid" ] && kill -0 "$(cat "$RUN_DIR/node$i.pid")" 2>/dev/null; then
    echo "node $i already running" >&2
    continue
  fi
  write_node_config "$RUN_DIR" 0 "$i" "$KEY" "$CERTS"
  start_node "$RUN_DIR" "$i"
done
wait_healthy "$RUN_DIR" 0
as_admin=(--ca "$CERTS/ca.pem" --cert "$CERTS/client-admin.pem" --key "$CERTS/client-admin.key")
"$BIN_DIR/mailvault-admin" "${as_admin[@]}" --endpoint 127.0.0.1:7101 status
cat <<MSG

mailvault is running (mTLS on every listener).
  client API (gRPC):     127.0.0.1:7101, 127.0.0.1:7102, 127.0.0.1:7103
  ops (health, metrics): http://127.0.0.1:7301/metrics (7302, 7303)
  certificates:          $CERTS (CA, nodes, and clients admin, admin2, auditor, frontend, reader)
  data, logs:            $RUN_DIR
  stop:                  deploy/local/down.sh

Use it as a bootstrap operator (admin and admin2 are the two: what one proposes,
the other approves):
  export PATH="$BIN_DIR:\$PATH" MAILVAULT_ENDPOINT=127.0.0.1:7101
  export MAILVAULT_CA=$CERTS/ca.pem MAILVAULT_CERT=$CERTS/client-admin.pem MAILVAULT_KEY=$CERTS/client-admin.key
  mailvault-admin status
MSG
