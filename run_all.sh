#!/usr/bin/env bash
# Every advex experiment, one line per result. Results: runs/results.md (table beside the paper's
# numbers), runs/results.json, PNG figures in runs/. Artifacts in runs/artifacts/ are reused, so an
# interrupted run resumes where it stopped.
#   bash run_all.sh                    # full size (one GPU)
#   QUICK=1 bash run_all.sh            # tiny sizes, CPU, seconds
#   bash run_all.sh --data /path/to/data --seeds 0,1,2   # extra flags go to every line
set -euo pipefail
cd "$(dirname "$0")"
args=("$@")
if [ "${QUICK:-0}" = 1 ]; then args+=(--quick); fi

python advex.py standard "${args[@]}"       # standard CIFAR-10 model
python advex.py robust "${args[@]}"         # L2 adversarially trained model (eps 0.5)
python advex.py ilyas "${args[@]}"          # Sec. 3: D_R, D_NR, D_rand, D_det and four fresh models (reuses the two above)
python toy2d.py --out runs                  # Wallace's 2D toy over 100 seeds, runs/toy2d.png
python advex.py mislabeled --arch resnet18 "${args[@]}"   # Wallace: learning only from a ResNet-18's errors
python advex.py mnist-fashion "${args[@]}"  # Wallace: an MNIST CNN's labels on Fashion-MNIST teach MNIST
python advex.py bugs "${args[@]}"           # Nakkiran: non-transferable adversarial examples teach nothing
python advex.py squares "${args[@]}"        # Nakkiran: adversarial squares
python advex.py leakage "${args[@]}"        # Goh: robust feature leakage into D_rand, not D_det
python advex.py transfer "${args[@]}"       # Ilyas Fig. 3: transfer rate vs learnability across architectures
