#!/usr/bin/env bash
# hearth on the servers: start (or install) local Redis, PostgreSQL and Mosquitto if needed, then
# run ingest and workers in one process against them. Extra arguments go to `hearth up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
HEARTH_MQTT_URL="${HEARTH_MQTT_URL:-mqtt://127.0.0.1:1883}" exec cargo run --release --locked --bin hearth -- up "$@"
