#!/bin/sh
# RUSTC_WRAPPER used by scripts/fuzz.sh: adds libFuzzer's coverage instrumentation (the flags
# cargo-fuzz passes, all stable rustc options) to this project's own crates and the fuzz targets,
# and runs every other rustc invocation unchanged. Dependencies therefore keep the fingerprints
# (and artifacts) scripts/test.sh already built in target/, so the fuzz build costs only what
# differs, and the fuzzer's coverage feedback comes from the parsers, not from their libraries.
#
# Safe only because these instrumented units never share a hash with uninstrumented ones:
# rustc flags added by a wrapper are invisible to cargo's fingerprints, but damselfly-mirror and
# -p2p (and -scheduler) are non-members of the fuzz workspace and so get `[profile.dev.package."*"]` opt-level 3
# there, unlike their opt-level-0 member builds in the root workspace; and the targets' crates
# exist only here. Registry crates are matched by neither test (note `digest` is also a
# RustCrypto crate: hence the match on the source path, not the crate name).
rustc=$1
shift
instrument=
prev=
for arg in "$@"; do
  case "$prev $arg" in
    "--crate-name damselfly_mirror" | "--crate-name damselfly_p2p" | "--crate-name damselfly_scheduler") instrument=1 ;;
  esac
  case "$arg" in
    fuzz_targets/*.rs | */fuzz/fuzz_targets/*.rs) instrument=1 ;;
  esac
  prev=$arg
done
if [ -n "$instrument" ]; then
  exec "$rustc" "$@" \
    -Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cllvm-args=-sanitizer-coverage-stack-depth
fi
exec "$rustc" "$@"
