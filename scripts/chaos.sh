#!/usr/bin/env bash
# The full chaos suite (issue 5's durations: 30 s outages, a 50,000-event SIGKILL run, 60 s of
# saturation...), one scenario at a time, each printing lost / duplicated / out of order / drain
# time. `scripts/test.sh` runs the short versions of the same scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
HEARTH_CHAOS_FULL=1 cargo test --locked --test chaos --test reliability -- --test-threads 1 --nocapture "$@" 2>&1 \
  | grep -E '^(chaos|test |test result)|panicked|worker-a stopped'
