# Sourced by install.sh, test.sh and compat.sh (not run on its own): what every pip call of this project needs.
#
# This machine's torch==2.13.0 is a CPU build in a wheel folder (/opt/wheels). pip finds it through
# PIP_FIND_LINKS, which a clean environment (env -i, a CI runner) lacks; without it every `pip install torch`,
# the install's and the tests' own fresh venvs (tests/test_install.py) alike, downloads CUDA's gigabytes from PyPI.
# Exported, so that the pip calls of the tests, run from test.sh, find it too.
machine_wheels=()
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
  if [ -d "$dir" ] && [[ " ${machine_wheels[*]:-} " != *" $dir "* ]]; then machine_wheels+=("$dir"); fi
done
if [ ${#machine_wheels[@]} -gt 0 ]; then export PIP_FIND_LINKS="${machine_wheels[*]}"; fi
unset machine_wheels dir

# pip into $PY's environment, quietly: pip's own exit status (a failure stops the caller); only its
# "Location ... is ignored" lines are dropped (one per find-links folder that holds nothing pip wants)
pip_install() {
  local log status=0
  log=$(mktemp)
  "$PY" -m pip install -q "$@" >"$log" 2>&1 || status=$?
  grep -v "^WARNING: Location" "$log" || true  # grep exits 1 when there is nothing else to print
  rm -f "$log"
  return "$status"
}
