#!/usr/bin/env bash
# Every advex experiment. Results: OUT/results.md (the table beside the paper's numbers, the claims and their
# verdicts), OUT/results.json, PNG figures in OUT (default runs/). Artifacts in OUT/artifacts/ are reused, so an
# interrupted run resumes where it stopped. It starts with the plan (what each stage will cost here and on one H100)
# and ends with where the time went, planned beside measured. The advex experiments run in one process (data read
# once, each shape tuned once); an experiment whose dataset is missing is NOT RUN, the others run, and the script
# then exits non-zero.
#   QUICK=1 bash run_all.sh            # tiny sizes, CPU, about a minute: checks the code path (numbers meaningless)
#   SCALE=cpu bash run_all.sh          # laptop scale: every claim on real data on a 2-core CPU (README: Laptop scale)
#   bash run_all.sh                    # full size (one GPU)
#   bash run_all.sh --data /path/to/data --seeds 3 --out DIR     # extra flags go to advex.py (and --out to toy2d.py)
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
out=runs  # the --out advex.py gets, for toy2d.py
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out) out="${args[i + 1]:-runs}" ;;
    --out=*) out="${args[i]#--out=}" ;;
  esac
done
start=$(date +%s)

experiments=(
  ilyas            # Sec. 3: the standard and the robust model, D_R, D_NR, D_rand, D_det, four fresh models; fig2.png, table1.png
  mislabeled       # Wallace: learning only from a ResNet-18's errors
  mnist-fashion    # Wallace: an MNIST CNN's labels on Fashion-MNIST teach MNIST (needs MNIST and Fashion-MNIST)
  bugs             # Nakkiran: non-transferable adversarial examples teach nothing
  squares          # Nakkiran: adversarial squares (his ResNet-18; no dataset)
  leakage          # Goh: robust feature leakage into D_rand, not D_det
  transfer         # Ilyas Fig. 3: transfer rate vs learnability across architectures
  frequency        # Gilmer & Hendrycks: filtered training, Fourier heat maps, fog / contrast / noise
  linear-features  # Goh: useful non-robust linear features, trucks vs frogs
  style            # Nakano: layer robustness and style transfer, standard vs robust model
  report           # where the time went (since this script started); the claims and their verdicts
)
"$PY" advex.py plan "${experiments[@]}" "${args[@]}"            # what each stage will cost here, before any work
"$PY" toy2d.py --out "$out"                                    # Wallace's 2D toy over 100 seeds, OUT/toy2d.png (CPU)
"$PY" advex.py "${experiments[@]}" --since "$start" "${args[@]}"  # everything else, in the order above
