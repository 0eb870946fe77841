#!/usr/bin/env bash
# Every advex experiment, one line per result. Results: OUT/results.md (the table beside the paper's numbers,
# the claims and their verdicts), OUT/results.json, PNG figures in OUT (default runs/). Artifacts in
# OUT/artifacts/ are reused, so an interrupted run resumes where it stopped. It ends with where the time went.
#   QUICK=1 bash run_all.sh            # tiny sizes, CPU, about a minute: checks the code path (numbers meaningless)
#   SCALE=cpu bash run_all.sh          # laptop scale: every claim on real data on a 2-core CPU in ~45 minutes
#   bash run_all.sh                    # full size (one GPU)
#   bash run_all.sh --data /path/to/data --seeds 3 --out DIR     # extra flags go to every advex.py line
#   PYTHON=/path/to/python bash run_all.sh                        # default: python3
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -c "import torch, torchvision" 2>/dev/null || {
  echo "run_all.sh: error: $PY cannot import torch and torchvision; run 'pip install -r requirements.txt' (or set PYTHON)" >&2
  exit 2
}
args=("$@")
if [ "${QUICK:-0}" = 1 ]; then args+=(--scale quick); elif [ -n "${SCALE:-}" ]; then args+=(--scale "$SCALE"); fi
out=runs  # the --out the advex lines get, for toy2d.py
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out) out="${args[i + 1]:-runs}" ;;
    --out=*) out="${args[i]#--out=}" ;;
  esac
done
start=$(date +%s)

"$PY" advex.py ilyas "${args[@]}"          # Sec. 3: the standard and the robust model, D_R, D_NR, D_rand, D_det, four fresh models; fig2.png, table1.png
"$PY" toy2d.py --out "$out"                # Wallace's 2D toy over 100 seeds, OUT/toy2d.png
"$PY" advex.py mislabeled --arch resnet18 "${args[@]}"   # Wallace: learning only from a ResNet-18's errors
"$PY" advex.py mnist-fashion "${args[@]}"  # Wallace: an MNIST CNN's labels on Fashion-MNIST teach MNIST
"$PY" advex.py bugs "${args[@]}"           # Nakkiran: non-transferable adversarial examples teach nothing
"$PY" advex.py squares --arch resnet18 "${args[@]}"      # Nakkiran: adversarial squares (his ResNet-18)
"$PY" advex.py leakage "${args[@]}"        # Goh: robust feature leakage into D_rand, not D_det
"$PY" advex.py transfer "${args[@]}"       # Ilyas Fig. 3: transfer rate vs learnability across architectures
"$PY" advex.py frequency "${args[@]}"      # Gilmer & Hendrycks: filtered training, Fourier heat maps, fog / contrast / noise
"$PY" advex.py linear-features "${args[@]}"  # Goh: useful non-robust linear features, trucks vs frogs
"$PY" advex.py style "${args[@]}"          # Nakano: layer robustness and style transfer, standard vs robust model
"$PY" advex.py report --since "$start" "${args[@]}"      # where the time went; the claims and their verdicts
