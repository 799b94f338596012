#!/usr/bin/env bash
# GPU acceptance in one device call (issues 18, 27): install what the machine lacks, time training
# uninstrumented (images/s, MFU, peak memory), run the GPU tests, the phase table of IResNet-50 at 112 px
# in bf16, the head at C = 1M, and torch.compile + channels_last on MobileFaceNet; results under $OUT.
#
#   OUT=DIR bash tools/gpu_acceptance.sh [--dry-run] [--wheelhouse DIR] [--budget SECONDS] [--only STEPS]
#
# --dry-run     the same steps on CPU with tiny shapes (so the wiring cannot rot without a GPU); the GPU
#               tests collect and skip.
# --wheelhouse  DIR built by tools/build_wheelhouse.sh (default: .wheelhouse/ when it exists). Whatever
#               step is asked for, what the machine lacks of it (DeepSpeed first) is installed offline
#               into a target folder put on PYTHONPATH (LARGEFR_SITE, default /tmp/largefr-site-cpXY),
#               never into the machine's environment; a dry run with nothing missing installs it into
#               a scratch folder instead, to prove it installs.
# --budget      total seconds for all steps (default 500: one 600 s device call, install included);
#               each step also has its own limit, so one hang cannot eat the rest.
# --only        comma-separated steps (install, throughput, gpu_tests, profile, bench_head, gpu_compile);
#               the preflight always runs, and the install whenever DeepSpeed is missing.
# $OUT gets summary.md, summary.json and results.tar.gz (every log and report), refreshed after each
# step so a run killed at its limit still returns what finished, plus the log of a step still
# running: at most 4 files, under the device's 8. Exits 0 when no step failed, 1 otherwise.
# PYTHON selects the interpreter (default python3, else python).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
WHEELHOUSE=""
BUDGET_S=500
ONLY=""
STEPS_KNOWN=",install,throughput,gpu_tests,profile,bench_head,gpu_compile,"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --wheelhouse) WHEELHOUSE="$(realpath -m "$2")"; shift 2 ;;
    --budget) BUDGET_S="$2"; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_acceptance.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for step in ${ONLY//,/ }; do
  if [[ $STEPS_KNOWN != *",$step,"* ]]; then
    echo "gpu_acceptance.sh: --only $step: no such step (${STEPS_KNOWN:1:-1})" >&2; exit 2
  fi
done
if [[ -z "${OUT:-}" ]]; then
  echo "gpu_acceptance.sh: set OUT to the folder for the results (the device tool sets it)" >&2; exit 2
fi
[[ -z "$WHEELHOUSE" && -d "$ROOT/.wheelhouse" ]] && WHEELHOUSE="$ROOT/.wheelhouse"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
PY_TAG="$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
SITE="${LARGEFR_SITE:-/tmp/largefr-site-$PY_TAG}"  # one per Python: its compiled wheels fit no other
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_acceptance.XXXXXX")"  # every step's files; packed into $OUT
TRAIN_RUN="$(mktemp -d)"  # the training folders the tools write; only their reports are kept
trap 'rm -rf "$TRAIN_RUN" "$WORK"' EXIT
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step killed at its limit still leaves its output in its log
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/largefr-torch-extensions-$PY_TAG}"
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT  # every tool here starts its own rank(s)
cd "$ROOT" || exit 2
STEPS="$WORK/steps.jsonl"
: > "$STEPS"
START=$(date +%s)

json_text() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "${s//$'\n'/ }"; }

record() {  # record STEP STATUS SECONDS RC REASON
  printf '{"step": %s, "status": %s, "seconds": %s, "rc": %s, "reason": %s}\n' "$(json_text "$1")" \
    "$(json_text "$2")" "$3" "$4" "$(json_text "$5")" >> "$STEPS"
  if [[ "$2" == skipped ]]; then echo "== $1: SKIPPED: $5"; else echo "== $1: $2 (${3}s)${5:+: $5}"; fi
}

pack() {  # summary.json, summary.md and results.tar.gz in $OUT, from $WORK
  "$PYTHON" tools/gpu_acceptance_summary.py --work "$WORK" --out "$OUT" --dry-run "$DRY_RUN" --budget "$BUDGET_S" "$@"
}

wanted() { [[ -z "$ONLY" || "$ONLY" == *",$1,"* ]]; }

run_step() {  # run_step NAME LIMIT_S COMMAND...: output in $OUT/NAME.log while it runs, then in the archive
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) - 5 ))
  if (( left < 15 )); then record "$name" skipped 0 0 "the ${BUDGET_S}s budget is spent"; pack --quiet; return 0; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local began rc
  began=$(date +%s)
  # timeout signals its whole process group, so ranks a step spawned go with it.
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local seconds=$(( $(date +%s) - began ))
  mv "$OUT/$name.log" "$WORK/$name.log"
  tail -n 25 "$WORK/$name.log"
  if (( rc == 124 || rc == 137 )); then
    record "$name" timeout "$seconds" "$rc" "over its ${limit}s limit; see $name.log"
  elif (( rc != 0 )); then
    record "$name" failed "$seconds" "$rc" "exit code $rc; see $name.log"
  else
    record "$name" passed "$seconds" 0 ""
  fi
  pack --quiet
}

# ------------------------------------------------------------------------------ the machine
run_step preflight 30 "$PYTHON" -c "
import importlib, json, platform, sys
import torch
def importable(name):
    try:
        importlib.import_module(name)  # nvidia.dali itself: CUDA wheels make an empty 'nvidia' namespace
        return True
    except Exception:
        return False
info = {'python': platform.python_version(), 'python_tag': 'cp%d%d' % sys.version_info[:2],
        'executable': sys.executable, 'torch': torch.__version__, 'cuda_available': torch.cuda.is_available(),
        'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
        'missing_modules': [m for m in ('numpy', 'yaml', 'PIL', 'pytest', 'pytest_timeout', 'deepspeed',
                                        'nvidia.dali') if not importable(m)]}
print(json.dumps(info, indent=2))
json.dump(info, open('$WORK/machine.json', 'w'), indent=2)
"
missing() {  # missing MODULE: the preflight found MODULE missing
  "$PYTHON" -c "import json, sys; sys.exit('$1' not in json.load(open('$WORK/machine.json'))['missing_modules'])" \
    2>/dev/null
}
CUDA="$("$PYTHON" -c "import json; print(json.load(open('$WORK/machine.json'))['cuda_available'])" 2>/dev/null)"
if [[ $DRY_RUN == 0 && "$CUDA" != True ]]; then
  record cuda failed 0 1 "no CUDA device visible to torch ($PYTHON); on a CPU machine use --dry-run"
  ONLY=",none,"  # nothing else can run
fi

# ------------------------------------------------------------------------------ install, then the comm op
if [[ $ONLY != ",none," ]] && { wanted install || missing deepspeed; }; then
  if [[ -n "$WHEELHOUSE" ]]; then
    SCRATCH=()
    [[ $DRY_RUN == 1 ]] && SCRATCH=(--scratch "$WORK/scratch-site")
    run_step install 90 "$PYTHON" tools/gpu_acceptance_install.py --wheelhouse "$WHEELHOUSE" --site "$SITE" \
      "${SCRATCH[@]}"
    rm -rf "$WORK/scratch-site"
  elif ! missing deepspeed; then
    record install skipped 0 0 "no --wheelhouse given and no .wheelhouse/; using the installed DeepSpeed"
  else
    record install failed 0 1 "DeepSpeed is missing and there is no wheelhouse: build one with bash \
tools/build_wheelhouse.sh --python X.Y and pass --wheelhouse (or carry .wheelhouse)"
  fi
elif [[ $ONLY != ",none," ]]; then
  record install skipped 0 0 "DeepSpeed is installed and the install step was not asked for"
fi

# DeepSpeed's CPU shared-memory comm op (JIT-compiled, ~50 s on 2 cores) serves the CPU ranks of the GPU
# tests (a checkpoint resumed on the CPU) and every DeepSpeed rank of a dry run: built once, now, in the
# background, into $TORCH_EXTENSIONS_DIR, so no test's time limit pays for it (a rank that needs it
# while it builds waits on torch's build lock).
build_comm_op() {
  local began=$(date +%s) rc
  DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" timeout --kill-after=10 300 "$PYTHON" -c \
    "from deepspeed.comm.torch import build_shm_op; print(build_shm_op())" > "$WORK/comm_op.log" 2>&1
  rc=$?
  record comm_op "$( ((rc == 0)) && echo passed || echo failed)" "$(( $(date +%s) - began ))" "$rc" \
    "built in the background after the install; see comm_op.log"
}
COMM_PID=""
needs_comm_op() { wanted gpu_tests || { [[ $DRY_RUN == 1 ]] && { wanted throughput || wanted profile; }; }; }
if [[ $ONLY != ",none," ]] && needs_comm_op && "$PYTHON" -c "import deepspeed" > /dev/null 2>&1; then
  build_comm_op &
  COMM_PID=$!
  if [[ $DRY_RUN == 1 ]]; then  # on a CPU every step below starts DeepSpeed ranks that need it at once
    wait "$COMM_PID"
    COMM_PID=""
  fi
fi

# ------------------------------------------------------------------------------ the steps
TRAIN_SET=(data.loader=synthetic "data.val_targets=[]" train.precision=bf16 logging.tensorboard=false)
if [[ $DRY_RUN == 1 ]]; then  # tiny shapes on CPU; still bf16, so the bf16 BatchNorm path runs
  TRAIN_SET+=(model.network=mbf data.image_size=16 train.batch_size=4 data.num_classes=1000 data.num_images=4000
              model.embedding_size=64 cluster.queue_size=64 cluster.num_sampled_centers=16)
  THROUGHPUT_STEPS=(--steps 2 --warmup 1)
  PROFILE_STEPS=(--steps 2 --warmup 1)
  BENCH=(--batch 8 --classes 4000 --dim 32 --world 1 --repeats 2 --warmup 1 --threads 1)
  BENCH_DTYPES=float32  # one dtype is enough to keep the wiring checked
else
  TRAIN_SET+=(model.network=r50 data.image_size=112 train.batch_size=128)
  THROUGHPUT_STEPS=(--steps 30 --warmup 5)
  PROFILE_STEPS=(--steps 10 --warmup 3)
  BENCH=(--batch 128 --classes 1000000 --dim 512 --world 1 --repeats 10 --warmup 3)
  BENCH_DTYPES="float32 bfloat16"
fi
wanted throughput && run_step throughput 75 "$PYTHON" tools/gpu_throughput.py --config configs/ms1m_r100.json \
  "${THROUGHPUT_STEPS[@]}" --json "$WORK/throughput.json" --set "${TRAIN_SET[@]}" "output=$TRAIN_RUN/throughput"

# On a CPU machine (the dry run) every test of tests/gpu skips: the step checks that they collect.
# -v lines let the summary count results from the log when pytest is stopped before its junit file.
GPU_PYTEST=("$PYTHON" -m pytest -v -m gpu -p no:cacheprovider -o timeout=150 -o junit_family=xunit1)
wanted gpu_tests && run_step gpu_tests 240 "${GPU_PYTEST[@]}" tests/gpu -k "not compile" \
  --junitxml="$WORK/gpu_tests.xml"

wanted profile && run_step profile 75 "$PYTHON" tools/profile_step.py --config configs/ms1m_r100.json \
  "${PROFILE_STEPS[@]}" --json "$WORK/profile.json" --set "${TRAIN_SET[@]}" "output=$TRAIN_RUN/profile"

for dtype in $BENCH_DTYPES; do
  wanted bench_head && run_step "bench_head_$dtype" 45 "$PYTHON" tools/bench_head.py "${BENCH[@]}" \
    --dtype "$dtype" --json "$WORK/bench_head_$dtype.json"
done

# Last: inductor's first compile of a network is the least predictable time here.
wanted gpu_compile && run_step gpu_compile 90 "${GPU_PYTEST[@]}" tests/gpu -k compile \
  --junitxml="$WORK/gpu_compile.xml"

# ------------------------------------------------------------------------------ not run, and the end
record dali skipped 0 0 "DALI's GPU decoder checks: its wheel (nvidia-dali-cuda*) is far over the 64 MiB a device \
run can carry and the device has none"
if [[ -n "$COMM_PID" ]]; then
  wait "$COMM_PID"  # bounded by its own timeout; normally long done
fi
pack
