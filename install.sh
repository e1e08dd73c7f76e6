#!/usr/bin/env bash
# Builds and installs `mesh` with cargo, then starts the daemon on its embedded local mesh.
# Idempotent: run it again after pulling changes; a running daemon of another version is restarted.
#
#   ./install.sh              install and start the daemon
#   ./install.sh --no-start   install only
#
# Needs the Rust toolchain (cargo, and the C compiler it links with). No network beyond crates.io.
set -euo pipefail

start=1
for arg in "$@"; do
  case "$arg" in
    --no-start) start=0 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")"
if ! command -v cargo >/dev/null 2>&1; then
  echo "install.sh: cargo not found; install Rust first: https://rustup.rs" >&2
  exit 1
fi

cargo install --locked --path cli --root "${CARGO_HOME:-$HOME/.cargo}"
bin="${CARGO_HOME:-$HOME/.cargo}/bin/mesh"
echo "installed $("$bin" --version) at $bin"
case ":$PATH:" in
  *":$(dirname "$bin"):"*) ;;
  *) echo "note: add $(dirname "$bin") to your PATH to run \`mesh\` by name" ;;
esac

[ "$start" = 1 ] || exit 0

new_version=$("$bin" --version | awk '{print $2}')
if running=$("$bin" daemon status --json 2>/dev/null); then
  old_version=$(printf '%s' "$running" | sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' | head -n 1)
  if [ "$old_version" != "$new_version" ]; then
    echo "restarting the daemon ($old_version -> $new_version)"
    "$bin" daemon down
  fi
fi
"$bin" daemon up
