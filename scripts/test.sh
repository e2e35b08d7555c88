#!/usr/bin/env bash
# Install what the project needs, lint, then run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/pip_env.sh  # the tests' own pip calls (fresh venvs) find the CPU torch as the install did
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check .  # pyproject.toml's [tool.ruff]: peft's 119 columns, pycodestyle and pyflakes
.venv/bin/python -m pytest -q -p no:cacheprovider -m "" "$@"  # -m "": every test (pyproject's default skips slow ones)
