#!/usr/bin/env bash
# GPU acceptance in one call (issue 18): install a wheelhouse, run the GPU tests, profile IResNet-50 at
# 112 px in bf16 on the synthetic loader, benchmark the head at C = 1M; every result under $OUT.
#
#   OUT=DIR bash tools/gpu_acceptance.sh [--dry-run] [--wheelhouse DIR] [--budget SECONDS] [--only STEPS]
#
# --dry-run     the same steps on CPU with tiny shapes (CI runs it so the wiring cannot rot): the
#               wheelhouse is resolved with `pip install --dry-run --ignore-installed` (nothing installed),
#               the GPU tests are collected and skip, the profile and the head benchmark run tiny.
# --wheelhouse  DIR built by tools/build_wheelhouse.sh: DeepSpeed and its dependencies, installed
#               offline without touching the machine's torch (deepspeed --no-deps; the rest with torch
#               pinned to the installed version). Without it, the installed DeepSpeed is used.
# --budget      total seconds for all steps (default 450, under 8 minutes); each step also has its own
#               limit, so one hang cannot eat the rest.
# --only        comma-separated steps to run (install, gpu_tests, profile, bench_head), e.g. to rerun one
#               that failed; the preflight always runs.
# Writes $OUT/summary.md and $OUT/summary.json (plus one log per step, gpu_tests.xml, profile.json,
# bench_head_*.json); prints what it skipped and why; exits 0 when no step failed, 1 otherwise.
# PYTHON selects the interpreter (default python3, else python). Written for docs/PERFORMANCE.md.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
WHEELHOUSE=""
BUDGET_S=450
DEEPSPEED_VERSION=0.19.8
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --wheelhouse) WHEELHOUSE="$(realpath -m "$2")"; shift 2 ;;
    --budget) BUDGET_S="$2"; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_acceptance.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z "${OUT:-}" ]]; then
  echo "gpu_acceptance.sh: set OUT to the folder for the results (the device tool sets it)" >&2; exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT  # every tool here starts its own rank(s)
cd "$ROOT" || exit 2
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
START=$(date +%s)

json_text() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "${s//$'\n'/ }"; }

record() {  # record STEP STATUS SECONDS RC REASON
  printf '{"step": %s, "status": %s, "seconds": %s, "rc": %s, "reason": %s}\n' "$(json_text "$1")" \
    "$(json_text "$2")" "$3" "$4" "$(json_text "$5")" >> "$STEPS"
  if [[ "$2" == skipped ]]; then echo "== $1: SKIPPED: $5"; else echo "== $1: $2 (${3}s)${5:+: $5}"; fi
}

wanted() { [[ -z "$ONLY" || "$ONLY" == *",$1,"* ]]; }

run_step() {  # run_step NAME LIMIT_S COMMAND...: the command's output goes to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local group=${name%_float32}
  group=${group%_bfloat16}
  if [[ $name != preflight ]] && ! wanted "$group"; then return 0; fi
  local left=$(( BUDGET_S - ($(date +%s) - START) - 5 ))
  if (( left < 15 )); then record "$name" skipped 0 0 "the ${BUDGET_S}s budget is spent"; return 0; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local began rc
  began=$(date +%s)
  # timeout signals its whole process group, so ranks a step spawned go with it.
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local seconds=$(( $(date +%s) - began ))
  tail -n 25 "$OUT/$name.log"
  if (( rc == 124 || rc == 137 )); then
    record "$name" timeout "$seconds" "$rc" "over its ${limit}s limit; see $name.log"
  elif (( rc != 0 )); then
    record "$name" failed "$seconds" "$rc" "exit code $rc; see $name.log"
  else
    record "$name" passed "$seconds" 0 ""
  fi
  return 0
}

# ------------------------------------------------------------------------------ the machine
run_step preflight 60 "$PYTHON" -c "
import importlib.util, json, platform, sys
import torch
info = {'python': platform.python_version(), 'python_tag': 'cp%d%d' % sys.version_info[:2],
        'torch': torch.__version__, 'cuda_available': torch.cuda.is_available(),
        'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
        'missing_modules': [m for m in ('numpy', 'yaml', 'PIL', 'pytest', 'deepspeed', 'nvidia.dali')
                            if importlib.util.find_spec(m.split('.')[0]) is None]}
print(json.dumps(info, indent=2))
json.dump(info, open('$OUT/machine.json', 'w'), indent=2)
"
field() { "$PYTHON" -c "import json; print(json.load(open('$OUT/machine.json')).get('$1', ''))" 2>/dev/null; }
CUDA="$(field cuda_available)"
PY_TAG="$(field python_tag)"
if [[ $DRY_RUN == 0 && "$CUDA" != True ]]; then
  record cuda failed 0 1 "no CUDA device visible to torch ($PYTHON); on a CPU machine use --dry-run"
  ONLY=",none,"  # nothing else can run
fi

# ------------------------------------------------------------------------------ the wheelhouse
install_wheelhouse() {
  local mode=() torch_version
  [[ $DRY_RUN == 1 ]] && mode=(--dry-run --ignore-installed)
  export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1  # the wheelhouse only, whatever pip.conf says
  if ! compgen -G "$WHEELHOUSE/pydantic_core-*-$PY_TAG-*.whl" > /dev/null; then
    echo "the wheelhouse $WHEELHOUSE has no pydantic-core wheel for this Python ($PY_TAG); it has:" \
         "$(ls "$WHEELHOUSE" | sed -n 's/^pydantic_core-[^-]*-\(cp[0-9]*\)-.*/\1/p' | tr '\n' ' ')." \
         "Rebuild it with: bash tools/build_wheelhouse.sh --python ${PY_TAG:2:1}.${PY_TAG:3}"
    return 3
  fi
  torch_version="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))')" || return 4
  echo "torch==$torch_version" > "$OUT/constraints.txt"  # the machine's torch stays as it is
  local deps
  deps="$(ls "$WHEELHOUSE" | sed -n 's/^\([A-Za-z0-9_.]*\)-[0-9].*\.whl$/\1/p' | grep -v '^deepspeed$' | sort -u)"
  "$PYTHON" -m pip install "${mode[@]}" --no-index --find-links "$WHEELHOUSE" --no-deps \
    "deepspeed==$DEEPSPEED_VERSION" || return 5
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install "${mode[@]}" --no-index --find-links "$WHEELHOUSE" -c "$OUT/constraints.txt" $deps \
    || return 6
  [[ $DRY_RUN == 1 ]] && return 0
  "$PYTHON" -c "import deepspeed, sys; print('deepspeed', deepspeed.__version__);
sys.exit(deepspeed.__version__ != '$DEEPSPEED_VERSION')"
}
if [[ -n "$WHEELHOUSE" ]]; then
  export -f install_wheelhouse
  export WHEELHOUSE PY_TAG DRY_RUN PYTHON OUT DEEPSPEED_VERSION
  run_step install 120 bash -c install_wheelhouse
elif wanted install; then
  record install skipped 0 0 "no --wheelhouse given; using the installed DeepSpeed"
fi

# ------------------------------------------------------------------------------ GPU tests
# On a CPU machine (the dry run) every test of tests/gpu skips: the step checks that they collect.
run_step gpu_tests 240 "$PYTHON" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -o timeout=180 \
  --junitxml="$OUT/gpu_tests.xml"

# ------------------------------------------------------------------------------ profile
PROFILE_RUN="$(mktemp -d)"  # the training folder tools/profile_step.py writes; only its report is kept
trap 'rm -rf "$PROFILE_RUN"' EXIT
PROFILE_SET=(data.loader=synthetic "data.val_targets=[]" train.precision=bf16 logging.tensorboard=false
             "output=$PROFILE_RUN")
if [[ $DRY_RUN == 1 ]]; then  # tiny shapes on CPU; still bf16, so the bf16 BatchNorm path runs
  PROFILE_SET+=(model.network=mbf data.image_size=16 train.batch_size=4 data.num_classes=1000 data.num_images=4000
                model.embedding_size=64 cluster.queue_size=64 cluster.num_sampled_centers=16)
  PROFILE_STEPS=(--steps 2 --warmup 1)
else
  PROFILE_SET+=(model.network=r50 data.image_size=112 train.batch_size=128)
  PROFILE_STEPS=(--steps 20 --warmup 5)
fi
run_step profile 180 "$PYTHON" tools/profile_step.py --config configs/ms1m_r100.json "${PROFILE_STEPS[@]}" \
  --json "$OUT/profile.json" --set "${PROFILE_SET[@]}"

# ------------------------------------------------------------------------------ head benchmark
BENCH=(--batch 128 --classes 1000000 --dim 512 --world 1 --repeats 10 --warmup 3)
BENCH_DTYPES="float32 bfloat16"
if [[ $DRY_RUN == 1 ]]; then  # one dtype is enough to keep the wiring checked
  BENCH=(--batch 8 --classes 4000 --dim 32 --world 1 --repeats 2 --warmup 1 --threads 1)
  BENCH_DTYPES=float32
fi
for dtype in $BENCH_DTYPES; do
  run_step "bench_head_$dtype" 90 "$PYTHON" tools/bench_head.py "${BENCH[@]}" --dtype "$dtype" \
    --json "$OUT/bench_head_$dtype.json"
done

# ------------------------------------------------------------------------------ not run
DALI_REASON="DALI's GPU decoder checks: its wheel (nvidia-dali-cuda*) is far over the 64 MiB a device run can"
record dali skipped 0 0 "$DALI_REASON carry and the device has none"

"$PYTHON" tools/gpu_acceptance_summary.py --out "$OUT" --dry-run "$DRY_RUN" --budget "$BUDGET_S"
