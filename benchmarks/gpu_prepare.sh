#!/usr/bin/env bash
# Put what benchmarks/gpu_check.sh carries to the GPU machine into .device/ (git ignores it; the device tool's
# `carry` takes it along): the peft wheel of constraints.txt, which the machine there may not have.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/wheels
PEFT="$(grep '^peft==' constraints.txt)"
.venv/bin/python -m pip download -q --no-deps "$PEFT" -d .device/wheels
ls -la .device/wheels
