# Shared by the local-cluster scripts. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN_DIR="${MAILVAULT_RUN_DIR:-$ROOT/deploy/local/run}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailvault-target}"
BIN_DIR="$CARGO_TARGET_DIR/debug"

# Prints the part of node $3's config that every local node shares: ports
# 71$2$3 (client), 72$2$3 (raft), 73$2$3 (ops), master key $4, the
# development certificates in $5, data in $1/node$3.
node_config_head() {
  local run=$1 base=$2 i=$3 key=$4 certs=$5
  cat <<TOML
node_id = $i
region = "local"
data_dir = "$run/node$i"
client_listen = "127.0.0.1:71$base$i"
raft_listen = "127.0.0.1:72$base$i"
ops_listen = "127.0.0.1:73$base$i"
master_key_file = "$key"

[tls]
ca_file = "$certs/ca.pem"
cert_file = "$certs/node-$i.pem"
key_file = "$certs/node-$i.key"

[access]
operators = ["admin", "admin2"]

TOML
}

# Writes RUN/node$3.toml: node $3 of a local three-node cluster (see
# node_config_head), with the three initial members.
write_node_config() {
  local run=$1 base=$2 i=$3 key=$4 certs=$5 roles=(active standby backup)
  {
    node_config_head "$@"
    for n in 1 2 3; do
      cat <<TOML
[members.$n]
role = "${roles[$((n-1))]}"
client_addr = "127.0.0.1:71$base$n"
raft_addr = "127.0.0.1:72$base$n"
ops_addr = "127.0.0.1:73$base$n"

TOML
    done
  } >"$run/node$i.toml"
}

# Writes RUN/node$3.toml for node $3 (4 or 5) that joins the local cluster
# later in role $6: a [join] table instead of [members].
write_joining_config() {
  local run=$1 base=$2 i=$3 role=$6
  {
    node_config_head "$@"
    cat <<TOML
[join]
role = "$role"
client_addr = "127.0.0.1:71$base$i"
raft_addr = "127.0.0.1:72$base$i"
ops_addr = "127.0.0.1:73$base$i"
TOML
  } >"$run/node$i.toml"
}

# Starts node $2 of the cluster in $1 in the background (pid and log there).
start_node() {
  nohup "$BIN_DIR/mailvault-node" --config "$1/node$2.toml" >"$1/node$2.log" 2>&1 &
  echo $! >"$1/node$2.pid"
}

# Waits until the three nodes of the cluster in $1 (ports 73$2N) are ready.
wait_healthy() {
  echo "waiting for the cluster to elect a leader..." >&2
  local healthy=0
  for _ in $(seq 1 60); do
    healthy=0
    for i in 1 2 3; do
      curl -fs "http://127.0.0.1:73$2$i/readyz" >/dev/null 2>&1 && healthy=$((healthy+1))
    done
    [ "$healthy" = 3 ] && return 0
    sleep 1
  done
  echo "error: cluster not healthy after 60s; logs in $1/node*.log" >&2
  exit 1
}

# Installs what a fresh Debian machine lacks to build mailvault.
ensure_prerequisites() {
  local missing=()
  command -v cc >/dev/null || missing+=(build-essential)
  dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
  command -v curl >/dev/null || missing+=(curl)
  # The chaos tests: nft (partitions), mkfs.ext4/e2fsck (power cuts), libfaketime (clock skew).
  command -v nft >/dev/null || missing+=(nftables)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  dpkg -s faketime >/dev/null 2>&1 || missing+=(faketime)
  if ((${#missing[@]})); then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The alert rules in deploy/prometheus are checked and unit-tested by Prometheus' promtool
  # (the Prometheus package, without its recommended exporters).
  if ! command -v promtool >/dev/null; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing prometheus (promtool)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  # The off-site backup tests: an S3-compatible server from PyPI.
  if ! command -v moto_server >/dev/null; then
    echo "installing moto[server] (S3 test server)" >&2
    if ! command -v pip3 >/dev/null && ! command -v pip >/dev/null; then
      local sudo=""
      [ "$(id -u)" -eq 0 ] || sudo="sudo"
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-pip >/dev/null
    fi
    local pip; pip=$(command -v pip3 || command -v pip)
    "$pip" install -q "moto[server]" 2>/dev/null || "$pip" install -q --break-system-packages "moto[server]"
    hash -r
  fi
  if ! command -v cargo >/dev/null; then
    echo "error: no Rust toolchain; install one with rustup (https://rustup.rs), then re-run" >&2
    exit 1
  fi
}
