#!/usr/bin/env bash
# The first GPU run in one command: every CUDA path of both workers (gsplat training against
# the CPU path, GPU SIFT, YOLO / SAM 2 / SAM 3 in fp16 on random weights, Orbit's five-stage
# job), one JSON line per
# check, in under 8 minutes on one GPU. On a machine without a GPU every check says `skipped`
# and why, and the script exits 0. See scripts/gpu_check.py for the checks and their options.
#
#   scripts/gpu_check.sh [--steps 300] [--only gsplat_training sift_gpu ...]
#
# Environment: PYTHON (default .venv/bin/python, else python3: inside the splat or infer image,
# the image's own), LIMIT_S (default 480: the whole run's limit).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3 || command -v python)
LIMIT_S=${LIMIT_S:-480}
export YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-$(mktemp -d)} YOLO_OFFLINE=1
cd "$REPO"
exec timeout --kill-after=10 "$LIMIT_S" "$PYTHON" scripts/gpu_check.py "$@"
