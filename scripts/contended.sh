#!/usr/bin/env bash
# Runs a command on CPU 0 alone while a CPU-bound process shares that core: a much slower
# machine than this one. Tests whose order of events is explicit pass here as they do on an
# idle machine; a test that races the clock fails. Usage: scripts/contended.sh CMD [ARGS...]
set -euo pipefail
taskset -c 0 python3 -c 'while True: pass' &
burner=$!
trap 'kill "$burner" 2>/dev/null || true' EXIT
taskset -c 0 timeout 1200 "$@"
