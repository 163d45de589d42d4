#!/usr/bin/env bash
# Fuzzes the parsers that read network input (targets in fuzz/fuzz_targets/: route, range,
# challenge, digest, upload, scheduler, preheat) with libFuzzer, coverage-guided.
#
#   scripts/fuzz.sh [SECONDS]          build, then run each target for SECONDS (default 10;
#                                      0 only builds)
#   scripts/fuzz.sh --asan [SECONDS]   the same through cargo-fuzz, with AddressSanitizer
#
# Default mode needs nothing beyond the stable toolchain: a plain `cargo build` of the fuzz crate
# in the root target/ with fuzz/sancov-rustc.sh as RUSTC_WRAPPER, which instruments only this
# project's crates, so the dependencies scripts/test.sh compiled are reused (CI runs this with
# a few seconds per target as the last step of scripts/test.sh).
#
# --asan installs cargo-fuzz from crates.io if missing (about 75 s) and builds with
# `RUSTC_BOOTSTRAP=1 cargo fuzz build` (-Zsanitizer=address on the stable toolchain) in
# fuzz/target: about 6 minutes the first time. RUSTC_BOOTSTRAP stays out of the root target/
# on purpose: build scripts such as proc-macro2's rerun when it changes, which would rebuild
# the whole dependency tree of the next normal build.
#
# Inputs found are kept in fuzz/corpus/<target>/ (fuzz/seeds/<target>/ are the committed seeds,
# read only); a crashing input lands in fuzz/artifacts/<target>/ and the script exits non-zero.
# Reproduce one with `target/debug/<target> fuzz/artifacts/<target>/crash-...`.
# FUZZ_TARGETS="route range" limits the run to some targets.
set -euo pipefail
cd "$(dirname "$0")/.."

asan=0
if [[ ${1:-} == --asan ]]; then
  asan=1
  shift
fi
seconds=${1:-10}
if ! [[ $seconds =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/fuzz.sh [--asan] [SECONDS]" >&2
  exit 2
fi
read -r -a targets <<<"${FUZZ_TARGETS:-route range challenge digest upload scheduler preheat}"
# libFuzzer options shared by both modes: a hang longer than 10 s is a finding too.
opts=(-max_total_time="$seconds" -timeout=10 -max_len=4096 -print_final_stats=1)

status=0
run_one() { # name, log, command...
  local t=$1 log=$2
  shift 2
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  if "$@" >"$log" 2>&1; then
    # libFuzzer's last progress line ("#N DONE cov: ... corp: ...") and its run count.
    echo "    $t: $(grep -E '^#[0-9]+\s+DONE' "$log" | tail -n1 | tr -s ' \t' ' ') ($(grep -E '^Done [0-9]+ runs' "$log" | tail -n1))"
  else
    echo "==> fuzz target $t FAILED (log: $log); its end:" >&2
    tail -n 40 "$log" >&2
    status=1
  fi
}

if ((asan)); then
  if ! command -v cargo-fuzz >/dev/null; then
    echo "==> cargo install cargo-fuzz"
    cargo install --locked cargo-fuzz --version '^0.13'
  fi
  echo "==> RUSTC_BOOTSTRAP=1 cargo fuzz build (release, AddressSanitizer; fuzz/target)"
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build)
  ((seconds > 0)) || exit 0
  for t in "${targets[@]}"; do
    echo "==> fuzz $t for ${seconds}s (AddressSanitizer)"
    run_one "$t" "fuzz/artifacts/$t.log" \
      env -C fuzz RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
      "${opts[@]}" -artifact_prefix="artifacts/$t/"
  done
else
  target_dir=${CARGO_TARGET_DIR:-$PWD/target}
  echo "==> cargo build --manifest-path fuzz/Cargo.toml --bins (coverage-instrumented)"
  if ! RUSTC_WRAPPER="$PWD/fuzz/sancov-rustc.sh" CARGO_TARGET_DIR="$target_dir" \
    cargo build --locked --manifest-path fuzz/Cargo.toml --bins; then
    echo "==> fuzz build failed. If fuzz/Cargo.lock is out of date (a dependency of mirror/ or p2p/" >&2
    echo "    changed), renew it from the root lock, which keeps the versions the same:" >&2
    echo "    cp Cargo.lock fuzz/Cargo.lock && cargo metadata --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null" >&2
    exit 1
  fi
  ((seconds > 0)) || exit 0
  for t in "${targets[@]}"; do
    echo "==> fuzz $t for ${seconds}s"
    run_one "$t" "fuzz/artifacts/$t.log" \
      "$target_dir/debug/$t" "${opts[@]}" -artifact_prefix="fuzz/artifacts/$t/" "fuzz/corpus/$t" "fuzz/seeds/$t"
  done
fi

if ((status != 0)); then
  echo "==> FUZZING FOUND A FAILURE" >&2
  exit "$status"
fi
echo "==> fuzzing found nothing"
