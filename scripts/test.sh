#!/usr/bin/env bash
# hearth's test command: start (or install) the servers the tests use, then run every test.
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh --test pipeline`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo test --workspace --locked "$@"
