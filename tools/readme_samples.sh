#!/usr/bin/env bash
# The README's sample outputs, regenerated from a real quickstart run: trains it (unless WORKDIR already
# holds runs/quickstart/summary.json), then runs each sample command and prints "$ command" and its output,
# ready to paste into README.md ("Sample outputs"). Usage: bash tools/readme_samples.sh WORKDIR
# (WORKDIR: a scratch folder; configs/, tools/ and launch/ are linked into it). Takes ~2 minutes on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${1:?usage: bash tools/readme_samples.sh WORKDIR}"
mkdir -p "$WORKDIR" && cd "$WORKDIR"
for name in configs tools launch; do [[ -e $name ]] || ln -s "$ROOT/$name" "$name"; done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ ! -f runs/quickstart/summary.json ]]; then
  echo "[$(date +%H:%M:%S)] training the quickstart (python launch/train.py --config configs/quickstart.json --world 2)" >&2
  python launch/train.py --config configs/quickstart.json --world 2 > quickstart.log 2>&1
fi
sample() {
  echo "\$ $*"
  "$@" 2>&1
  echo
}
sample python tools/eval_verification.py --checkpoint runs/quickstart/checkpoints --bins .cache/quickstart/synth_val.bin
sample python tools/export_backbone.py --checkpoint runs/quickstart/checkpoints/step_300 --out model.pt
sample python tools/plot_similarity.py --weights model.pt --bins .cache/quickstart/synth_val.bin --out sim.png
sample python tools/export_onnx.py --weights model.pt --out model.onnx --bins .cache/quickstart/synth_val.bin
