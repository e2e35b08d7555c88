#!/usr/bin/env bash
# Install, then fine-tune the embedded MiniLM with Dual LoRA on BBC News and print loss and test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python examples/quickstart.py "$@"
