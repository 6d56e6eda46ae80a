#!/usr/bin/env bash
# hearth's run command: start (or install) local Redis, PostgreSQL and Mosquitto if needed, then
# run ingest and workers in one process against them. Extra arguments go to `hearth up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
exec cargo run --release --locked --bin hearth -- up "$@"
