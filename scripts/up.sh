#!/usr/bin/env bash
# hearth's run command: `hearth up` with nothing configured, so embedded: its own MQTT broker
# (127.0.0.1:1883), its queue and store in SQLite (./hearth-data), the API and dashboard on
# http://127.0.0.1:8080/. Needs only a Rust toolchain. Extra arguments go to `hearth up`
# (`--demo` also runs the simulator). For the Redis/PostgreSQL/Mosquitto stack: scripts/up-servers.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
  echo "up: cargo not found; install Rust from https://rustup.rs" >&2
  exit 2
fi
exec cargo run --release --locked --bin hearth -- up "$@"
