#!/usr/bin/env bash
# Installs Triton's perf_analyzer into .tools/perf_analyzer/ for the test that drives the server
# with it (tests/service/test_perf_analyzer.py). perf_analyzer ships inside the tritonclient
# 2.40.0 wheel (bin/perf_analyzer); it links libcudart.so.12, taken from PyPI's
# nvidia-cuda-runtime-cu12 wheel, and Debian's libb64 (scripts/install-system-tools.sh), and runs
# on the CPU. The wheels are only unpacked here, never installed into the venv (its tritonclient
# is newer). Usage: install-perf-analyzer.sh PYTHON
set -euo pipefail
python=${1:-python3}
target=.tools/perf_analyzer
if [ -x "$target/perf_analyzer" ] && [ -e "$target/lib/libcudart.so.12" ]; then
  exit 0
fi
downloads=$(mktemp -d)
trap 'rm -rf "$downloads"' EXIT
"$python" -m pip download --quiet --no-deps --dest "$downloads" \
  tritonclient==2.40.0 nvidia-cuda-runtime-cu12==12.4.127
mkdir -p "$target/lib"
"$python" - "$downloads" "$target" <<'PY'
import pathlib, shutil, sys, zipfile

downloads, target = map(pathlib.Path, sys.argv[1:])
wanted = {
    "tritonclient-2.40.0.data/data/bin/perf_analyzer": target / "perf_analyzer",
    "nvidia/cuda_runtime/lib/libcudart.so.12": target / "lib" / "libcudart.so.12",
}
for wheel in downloads.glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in set(archive.namelist()) & set(wanted):
            with archive.open(name) as source, open(wanted[name], "wb") as out:
                shutil.copyfileobj(source, out)
missing = [str(path) for path in wanted.values() if not path.exists()]
if missing:
    sys.exit(f"not found in the wheels: {missing}")
PY
chmod +x "$target/perf_analyzer"
echo "perf_analyzer installed in $target"
