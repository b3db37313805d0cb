#!/usr/bin/env bash
# Installs convserve and one image's dependency set into the environment of the `python` on
# PATH, every version fixed by constraints.txt (the versions the tests ran). Each Dockerfile runs
# it in its build stage from the build context; tests/deploy/test_image_installs.py runs it the
# same way in a fresh virtual environment and serves a request from the result, so what the
# images install is what is tested.
#
#   bash scripts/install-deps.sh server       # .[serving-cpu]: the CPU-only onnxruntime
#   bash scripts/install-deps.sh server-gpu   # .[serving], onnxruntime-gpu from constraints-gpu-image.txt
#   bash scripts/install-deps.sh trainer      # .[training]: PyTorch
#
# TORCH_INDEX_URL (trainer): an extra index for PyTorch, e.g. https://download.pytorch.org/whl/cpu
# for the CPU-only build (about 200 MB instead of several GB of CUDA wheels); the constraint
# torch==X matches X+cpu, and pip prefers the local version.
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
constraints="$src/constraints.txt"
overrides=""
case "${1:-}" in
    server) extra=serving-cpu ;;
    server-gpu) extra=serving; overrides="$src/constraints-gpu-image.txt" ;;
    trainer) extra=training ;;
    *)
        echo "unknown image '${1:-}'; choose one of: server, server-gpu, trainer" >&2
        exit 2
        ;;
esac

if [ -n "$overrides" ]; then
    # pip refuses two pins of one distribution: each line of the overrides replaces
    # constraints.txt's line for the same name.
    merged=$(mktemp)
    trap 'rm -f "$merged"' EXIT
    names=$(sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' "$overrides" | sed 's/\./\\./g' | paste -sd'|' -)
    grep -v -i -E "^($names)==" "$constraints" > "$merged"
    grep -v -E '^[[:space:]]*(#|$)' "$overrides" >> "$merged"
    constraints=$merged
fi

index_args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    index_args=(--extra-index-url "$TORCH_INDEX_URL")
fi

# The tools first: a venv of Python 3.11 starts with its own (older) pip and setuptools.
python -m pip install --quiet --constraint "$constraints" pip setuptools
python -m pip install --quiet --constraint "$constraints" --build-constraint "$constraints" \
    "${index_args[@]}" "$src[$extra]"
python -m pip check
