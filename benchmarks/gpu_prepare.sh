#!/usr/bin/env bash
# Put what benchmarks/gpu_check.sh carries to the GPU machine into .device/ (git ignores it; the device tool's
# `carry` takes it along): the peft wheel of constraints.txt, which the machine there may not have, and this
# machine's bitsandbytes (pure Python plus ctypes-loaded libraries, so any Python there can import it) cut to its
# CUDA 13 and CPU libraries: whole it is 125 MB, over the 64 MiB carry limit; cut, about 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/wheels
PEFT="$(grep '^peft==' constraints.txt)"
.venv/bin/python -m pip download -q --no-deps "$PEFT" -d .device/wheels
BNB="$(.venv/bin/python -c 'import importlib.util; print(importlib.util.find_spec("bitsandbytes").submodule_search_locations[0])')"
rm -rf .device/bnb && mkdir -p .device/bnb
cp -r "$BNB" .device/bnb/
find .device/bnb/bitsandbytes -name 'libbitsandbytes_*' ! -name '*_cuda13*' ! -name '*_cpu.*' -delete
find .device/bnb -name '__pycache__' -prune -exec rm -rf {} +
ls -la .device/wheels .device/bnb/bitsandbytes/*.so
du -sh .device
