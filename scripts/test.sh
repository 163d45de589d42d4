#!/usr/bin/env bash
# The one test command of the project (README and .ci/run call exactly this).
#   1. installs the external test dependencies (real registry, containerd, skopeo, ...);
#   2. builds the `damselfly` binary, which the CLI smoke test runs as a child process;
#   3. runs every unit test, then the end-to-end tests in integration/;
#   4. builds the benchmarks (p2p/benches, scheduler/benches; `cargo bench -p <crate>` runs them);
#   5. builds the fuzz targets (fuzz/) and runs each for a few seconds from its seeds.
# Exits non-zero if anything failed.
#
# Environment knobs:
#   DAMSELFLY_UNIT_TEST_THREADS         test threads for unit tests (default 2: the CI box has 2 cores)
#   DAMSELFLY_INTEGRATION_TEST_THREADS  test threads per integration test binary (default 1: each test
#                                       starts real registries, containerd and 100 MiB transfers, and
#                                       several at once on 2 cores only makes timing-sensitive paths flaky)
#   DAMSELFLY_FUZZ_SECONDS              seconds each fuzz target runs (default 3; 0 only builds them)
#   CARGO_INCREMENTAL                   default 0 here: a one-shot run gains nothing from
#                                       incremental caches, which cost several GB of disk
#   extra arguments are passed to both `cargo test` runs before `--` (e.g. `--release`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

# Free space and the build's size, before and after: a full disk shows up as linker crashes
# (ld "Bus error") far from its cause.
disk_report() {
  echo "==> disk ($1): $(df -h --output=avail . | tail -n1 | tr -d ' ') free; target/ $(du -sh target 2>/dev/null | cut -f1)"
}
disk_report start

scripts/install-test-deps.sh

unit_threads=${DAMSELFLY_UNIT_TEST_THREADS:-2}
integration_threads=${DAMSELFLY_INTEGRATION_TEST_THREADS:-1}

echo "==> cargo build -p damselfly"
cargo build --locked "$@" -p damselfly

# Both phases always run, so one failing unit test does not hide the end-to-end picture.
status=0
echo "==> unit tests"
cargo test --workspace --locked "$@" --exclude damselfly-integration -- --test-threads="$unit_threads" || status=1

echo "==> integration tests"
cargo test --locked "$@" -p damselfly-integration -- --test-threads="$integration_threads" || status=1

echo "==> benchmarks build"
cargo bench -p damselfly-p2p -p damselfly-scheduler --no-run --locked || status=1

# Coverage-guided, reusing the dependencies built above; see scripts/fuzz.sh.
echo "==> fuzz targets"
scripts/fuzz.sh "${DAMSELFLY_FUZZ_SECONDS:-3}" || status=1

disk_report end
if ((status != 0)); then
  echo "==> TESTS FAILED" >&2
  exit "$status"
fi
echo "==> all tests passed"
