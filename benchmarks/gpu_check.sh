#!/usr/bin/env bash
# The GPU side of benchmarks/gpu_check.py, as one call of the device tool (README, "Performance on a GPU"):
#
#   (here, once)   bash benchmarks/gpu_prepare.sh          # the pinned peft wheel into .device/wheels (ignored)
#   (device tool)  run command="bash benchmarks/gpu_check.sh" carry=[".device"] timeout_s=570
#
# The machine there has its own torch (a CUDA build), transformers and accelerate, and no network. duallora runs
# from src/ (nothing is installed); peft is the carried wheel, unpacked beside it, whatever peft is there (its
# version is printed). Results go to $OUT (gpu_check.json, gpu_check.md, the log), which the tool brings back.
# A rehearsal on this machine: PYTHON=.venv/bin/python GPU_CHECK_FLAGS=--dry-run BUDGET_S=50 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT" .device/site
PY="${PYTHON:-python3}"
echo "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
$PY - <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())
for name in ("transformers", "accelerate", "safetensors", "peft", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001 - report whatever is missing, the check below decides
        print(name, "missing:", err)
PYEOF
if ls .device/wheels/peft-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index --target .device/site .device/wheels/peft-*.whl || exit 3
fi
export PYTHONPATH="$PWD/.device/site:$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
# bitsandbytes for the 4-bit rows: the machine's own if it has one, else the cut copy gpu_prepare.sh carried
if ! $PY -c "import bitsandbytes" >/dev/null 2>&1 && [ -d .device/bnb/bitsandbytes ]; then
  export PYTHONPATH="$PWD/.device/bnb:$PYTHONPATH"
fi
$PY -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__, bitsandbytes.__file__)" 2>&1 | tail -1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY -c "import duallora, peft; print('duallora', duallora.__version__, 'with peft', peft.__version__, peft.__file__)" \
  || exit 4
# shellcheck disable=SC2086  # GPU_CHECK_FLAGS holds separate words on purpose
$PY benchmarks/gpu_check.py --out "$OUT" --budget-s "${BUDGET_S:-480}" ${GPU_CHECK_FLAGS:-} 2>&1 \
  | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
