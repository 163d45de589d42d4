#!/usr/bin/env bash
# Thin wrapper: scripts/bench.sh [--size-mib N] [--runs N] [--clients N] [--json OUT] ...
# See scripts/bench.py for what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/bench.py "$@"
