#!/usr/bin/env bash
# hearth's test command: start (or install) the servers the tests use, then run every test, then
# fuzz the HTTP API with schemathesis (0 server errors allowed).
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh --test pipeline` (which skips the
# API fuzzing).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# `hearth bench` runs the hearth-bench program beside hearth (tests/observe.rs runs a small
# bench): build every binary first, which `cargo test` alone does not promise for hearth-bench.
cargo build --workspace --locked --bins
cargo test --workspace --locked "$@"
if [ $# -eq 0 ]; then
  scripts/apifuzz.sh
fi
