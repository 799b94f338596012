#!/usr/bin/env bash
# Wheelhouse for a GPU machine without network: DeepSpeed 0.19.8 and what it (and the GPU tests) need
# beyond torch, for the machine's CPython. tools/gpu_acceptance.sh installs what the machine lacks of it.
#
#   bash tools/build_wheelhouse.sh [--out DIR] [--python "3.12"] [--extra "numpy pillow"]
#
# --out      where the wheels go (default .wheelhouse/, gitignored); emptied first.
# --python   CPython versions to fetch the compiled wheels for (pydantic-core, msgpack, pyyaml: one
#            wheel per version; default 3.12, the lent GPU machines' Python); the pure-Python wheels
#            fit every version. Add this machine's version ("3.11 3.12") to try the install here.
# --extra    also fetch these compiled packages per version (numpy ~17 MiB and pillow ~7 MiB per
#            version: only for a machine known to lack them, with a single --python).
# Needs this machine's network (the package registry) and a Python with torch for DeepSpeed's
# setup.py (PYTHON, default .venv/bin/python, else python3); DeepSpeed's C++/CUDA ops are not
# prebuilt (DS_BUILD_OPS=0: they are compiled on first use on the GPU machine, as a plain
# `pip install deepspeed` does). Fails when the result is over 64 MiB (the device tool's carry limit).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$ROOT/.wheelhouse"
PYTHON_VERSIONS="3.12"
EXTRA=""
LIMIT_MIB=64
DEEPSPEED_VERSION=0.19.8
# DeepSpeed's runtime requirements (torch and numpy left to the machine), pydantic's, and the test runner's.
PURE="einops hjson ninja packaging psutil py-cpuinfo pydantic annotated-types typing-extensions
typing-inspection tqdm pytest pluggy iniconfig pygments pytest-timeout"
COMPILED="pydantic-core msgpack pyyaml"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR="$(realpath -m "$2")"; shift 2 ;;
    --python) PYTHON_VERSIONS="$2"; shift 2 ;;
    --extra) EXTRA="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build_wheelhouse.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
"$PYTHON" -c "import torch" 2>/dev/null || {
  echo "build_wheelhouse.sh: $PYTHON has no torch; DeepSpeed's setup.py needs it (set PYTHON=...)" >&2; exit 2; }

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# The pydantic-core pin must be pydantic's own (pydantic requires one exact version).
PYDANTIC_CORE_PIN=""

echo "== DeepSpeed $DEEPSPEED_VERSION (pure-Python wheel, ops not prebuilt)"
DS_BUILD_OPS=0 DS_BUILD_STRING="" "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation \
  -w "$OUT_DIR" "deepspeed==$DEEPSPEED_VERSION"

echo "== pure-Python dependencies"
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --only-binary=:all: --no-deps "${PLATFORMS[@]}" --python-version 3.11 \
  --implementation cp -d "$OUT_DIR" $PURE
PYDANTIC_WHEEL="$(ls "$OUT_DIR"/pydantic-[0-9]*.whl)"
PYDANTIC_CORE_PIN="$("$PYTHON" - "$PYDANTIC_WHEEL" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    print(re.search(r"^Requires-Dist: pydantic-core==([^ ;\n]+)", wheel.read(metadata).decode(), re.M).group(1))
PY
)"
echo "   pydantic $(basename "$PYDANTIC_WHEEL") needs pydantic-core==$PYDANTIC_CORE_PIN"

for version in $PYTHON_VERSIONS; do
  echo "== compiled wheels for CPython $version"
  packages="${COMPILED/pydantic-core/pydantic-core==$PYDANTIC_CORE_PIN} $EXTRA"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q --only-binary=:all: --no-deps "${PLATFORMS[@]}" --python-version "$version" \
    --implementation cp -d "$OUT_DIR" $packages
done

size_mib=$(( $(du -sb "$OUT_DIR" | cut -f1) / 1048576 ))
echo "== $(ls "$OUT_DIR" | wc -l) wheels, ${size_mib} MiB in $OUT_DIR (CPython: $PYTHON_VERSIONS)"
if (( size_mib >= LIMIT_MIB )); then
  echo "build_wheelhouse.sh: ${size_mib} MiB is over the ${LIMIT_MIB} MiB a device run can carry; use fewer" \
       "--python versions or no --extra" >&2
  exit 1
fi
