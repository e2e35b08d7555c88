#!/usr/bin/env bash
# Install, then run `duallora` with the given arguments; with none, the embedded default: Dual LoRA against LoRA
# at the same parameter count on MiniLM + sentiment, 2 seeds (12-15 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/duallora "$@"
