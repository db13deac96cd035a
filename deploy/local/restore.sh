#!/usr/bin/env bash
# Restores a backup of the local cluster (up.sh) into a second local cluster
# and starts it: 127.0.0.1:7111-7113 (client), 7211-7213 (raft), 7311-7313
# (ops), data in deploy/local/run-restored, the same master key and
# development certificates. The backup is read from the local cluster's
# off-site directory (node 3's data_dir/offsite); ship one first with
# `mailvault-admin backup ship-now`. Usage: deploy/local/restore.sh [ID|latest].
# A cluster restore is a two-person operation: the development operators
# `admin` (rehearses and signs the plan) and `admin2` (reads and signs it)
# stand in for the two people here, who in production each sign on their own
# machine with their own key (README, "Restoring a cluster"); set
# MAILVAULT_PROPOSER / MAILVAULT_APPROVER to use others.
# Stop it with MAILVAULT_RUN_DIR=deploy/local/run-restored deploy/local/down.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BACKUP="${1:-latest}"
SOURCE_RUN="$RUN_DIR"
TARGET_RUN="${MAILVAULT_RESTORED_DIR:-$ROOT/deploy/local/run-restored}"
OFFSITE="$SOURCE_RUN/node3/offsite"
if [ ! -d "$OFFSITE" ]; then
  echo "error: no off-site copies in $OFFSITE: start the cluster (up.sh) and run 'backup ship-now' first" >&2
  exit 1
fi
for i in 1 2 3; do
  if [ -f "$TARGET_RUN/node$i.pid" ] && kill -0 "$(cat "$TARGET_RUN/node$i.pid")" 2>/dev/null; then
    echo "error: the restored cluster is running; stop it first:" >&2
    echo "  MAILVAULT_RUN_DIR=$TARGET_RUN deploy/local/down.sh && rm -rf $TARGET_RUN" >&2
    exit 1
  fi
done
rm -rf "$TARGET_RUN"
mkdir -p "$TARGET_RUN"
configs=()
for i in 1 2 3; do
  write_node_config "$TARGET_RUN" 1 "$i" "$SOURCE_RUN/master.key" "$SOURCE_RUN/certs"
  configs+=(--config "$TARGET_RUN/node$i.toml")
done
certs="$SOURCE_RUN/certs"
as_id() { "$BIN_DIR/mailvault-admin" --ca "$certs/ca.pem" --cert "$certs/client-$1.pem" --key "$certs/client-$1.key" "${@:2}"; }
plan="$TARGET_RUN/restore-plan.json"
as_id "${MAILVAULT_PROPOSER:-admin}" backup restore --from "file://$OFFSITE" --backup "$BACKUP" "${configs[@]}" \
  --reason "${MAILVAULT_RESTORE_REASON:-local restore (deploy/local/restore.sh)}" --plan-out "$plan"
hash=$(sed -n 's/^  "plan_hash": "\([0-9a-f]*\)",$/\1/p' "$plan")
as_id "${MAILVAULT_APPROVER:-admin2}" backup approve-restore "$plan" --yes --plan-hash "$hash"
as_id "${MAILVAULT_PROPOSER:-admin}" backup restore --plan "$plan" "${configs[@]}"
for i in 1 2 3; do
  start_node "$TARGET_RUN" "$i"
done
wait_healthy "$TARGET_RUN" 1
echo "the restored cluster is running: client API 127.0.0.1:7111-7113; data and logs in $TARGET_RUN" >&2
