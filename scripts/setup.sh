#!/usr/bin/env bash
# Creates .venv (once) and installs the workers' dependencies into it. Idempotent: a second
# run only checks. TORCH_INDEX_URL picks PyTorch's build (default: PyPI's, CUDA on x86_64).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.installed-$(cat requirements.txt requirements-dev.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1 --index-url "$TORCH_INDEX_URL"
else
  "$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
# SAM 2 is a source release: built against this torch, without its optional CUDA extension.
"$VENV/bin/python" -m pip install --quiet setuptools==80.9.0 wheel==0.45.1
SAM2_BUILD_CUDA=0 "$VENV/bin/python" -m pip install --quiet --no-build-isolation sam2==1.1.0
"$VENV/bin/python" -m pip install --quiet -r requirements-dev.txt
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "set up $VENV"
