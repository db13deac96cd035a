# Shared by the local-cluster scripts. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN_DIR="${MAILVAULT_RUN_DIR:-$ROOT/deploy/local/run}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailvault-target}"
BIN_DIR="$CARGO_TARGET_DIR/debug"

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
