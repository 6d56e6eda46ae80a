#!/usr/bin/env bash
# hearth on the servers: start (or install) local Redis, PostgreSQL and Mosquitto if needed, then
# run ingest and workers in one process against them. Extra arguments go to `hearth up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
export HEARTH_MQTT_URL="${HEARTH_MQTT_URL:-mqtt://127.0.0.1:1883}"
export HEARTH_REDIS_URL="${HEARTH_REDIS_URL:-redis://127.0.0.1:6379}"
export HEARTH_DATABASE_URL="${HEARTH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/hearth}"
exec cargo run --release --locked --bin hearth -- up "$@"
