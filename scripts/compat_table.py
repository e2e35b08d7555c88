"""Helper of scripts/compat.sh (issue 27, point 6).

  compat_table.py deps NAME...      the project's requirements (dependencies and the cli, test and quantized extras),
                                    one a line, with the version bounds of NAME... dropped
  compat_table.py versions          the installed versions of the stack, as JSON (run it with the venv's python)
  compat_table.py latest            the latest release of each that the package index lists (pip index versions)
  compat_table.py table DIR CMD     the markdown table of DIR's runs (pinned, newest), printed and written to
                                    docs/compat/newest.md and docs/compat/newest.json; CMD: the command that made them
"""

import datetime
import json
import re
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK = ["torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"]
EXTRA_VERSIONS = ["datasets", "huggingface_hub", "safetensors"]  # in the JSON only: what the newest set pulled in
TEST_FILES = ["tests/test_peft_integration.py", "tests/test_trainer.py", "tests/test_trl.py",
              "tests/test_mixed_batch.py", "tests/test_merge.py"]
ROWS = {"pinned": "pinned (constraints.txt, .venv)", "newest": "newest (.venv-newest)"}


def req_name(req: str) -> str:
    return re.match(r"[A-Za-z0-9_.\-]+", req).group(0)


def deps(unbounded: list[str]) -> list[str]:
    import tomllib  # Python >= 3.11 (the machine's 3.11.7)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, out, todo = project["optional-dependencies"], [], list(project["dependencies"])
    todo += [r for extra in ("cli", "test", "quantized") for r in extras[extra]]
    for req in todo:
        name = req_name(req)
        if name == project["name"]:  # a self-reference ("duallora[quantized]"): its extras are in the list already
            continue
        # NAME alone: pip --upgrade then takes the newest release, whatever cap pyproject sets
        out.append(name if name.lower() in unbounded else req)
    return list(dict.fromkeys(out))


def versions() -> dict:
    found = {}
    for name in STACK + EXTRA_VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = sys.version.split()[0]
    return found


def latest() -> dict:
    import subprocess
    found = {"torch": "2.13.0 (pinned)"}  # torch stays pinned: the CPU build on disk
    for name in STACK[1:]:
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                             capture_output=True, text=True).stdout
        found[name] = (re.search(r"\((\S+)\)", out) or [None, None])[1]  # first line: "NAME (LATEST)"
    return found


def constraint_versions() -> dict:
    """The pinned versions as constraints.txt gives them (when .venv is absent)."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
    return {name: pins.get(name) for name in STACK}


def first_line(text: str | None) -> str:
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), "")


def test_file(case: ET.Element) -> str:
    """The test file of a junit testcase: classname is the module (a collection error: empty, the name is)."""
    module = case.get("classname") or case.get("name", "")
    for path in TEST_FILES:
        stem = path[:-3].replace("/", ".")
        if module == stem or module.startswith(stem + "."):
            return path
    return module


def read_run(directory: Path, label: str) -> dict:
    """One row: versions, per-file counts and failures from DIR/LABEL.versions.json, .xml, .rc."""
    vfile, xml, rc = (directory / f"{label}{ext}" for ext in (".versions.json", ".xml", ".rc"))
    row = {"versions": json.loads(vfile.read_text()) if vfile.exists() else constraint_versions(),
           "tests": None, "failures": [], "seconds": None,
           "pytest_rc": int(rc.read_text()) if rc.exists() else None}
    if not xml.exists():  # not run (the pinned row without --pinned), or pytest died before writing it
        return row
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    row["seconds"] = round(float(suite.get("time", 0)), 1)
    counts = {path: {"passed": 0, "failed": 0, "skipped": 0} for path in TEST_FILES}
    for case in suite.iter("testcase"):
        path = test_file(case)
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        outcome = "failed" if bad is not None else "skipped" if case.find("skipped") is not None else "passed"
        counts.setdefault(path, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
        if bad is not None:  # message: pytest's one-line summary of the exception ("ValueError: ...")
            row["failures"].append({"test": f"{path}::{case.get('name')}",
                                    "error": first_line(bad.get("message")) or first_line(bad.text)})
    row["tests"] = counts
    return row


def cell(counts: dict | None) -> str:
    return "not run" if counts is None else "{passed} / {failed} / {skipped}".format(**counts)


def table(directory: Path, command: str) -> str:
    rows = {label: read_run(directory, label) for label in ROWS}
    index = json.loads((directory / "latest.json").read_text()) if (directory / "latest.json").exists() else {}
    date = datetime.date.today().isoformat()
    lines = ["# Compatibility: pinned vs newest releases", "",
             f"Generated {date} by `{command}` (integration tests on the CPU, HF_HUB_OFFLINE=1).", "",
             "| set | " + " | ".join(STACK) + " |", "|---" * (len(STACK) + 1) + "|"]
    for label, title in ROWS.items():
        lines.append(f"| {title} | " + " | ".join(rows[label]["versions"].get(n) or "-" for n in STACK) + " |")
    if index:  # a newest-row version below this one: that release would not install here (see the pip log)
        lines.append("| latest on the index | " + " | ".join(index.get(n) or "-" for n in STACK) + " |")
    lines += ["", "Tests: passed / failed / skipped (failed includes errors).", "",
              "| test file | " + " | ".join(ROWS) + " |", "|---" * (len(ROWS) + 1) + "|"]
    files = list(dict.fromkeys(p for row in rows.values() for p in (row["tests"] or TEST_FILES)))
    for path in files:
        lines.append(f"| {path} | " + " | ".join(cell((r["tests"] or {}).get(path) if r["tests"] else None)
                                                  for r in rows.values()) + " |")
    totals = [None if r["tests"] is None else {k: sum(c[k] for c in r["tests"].values())
                                               for k in ("passed", "failed", "skipped")} for r in rows.values()]
    lines.append("| **total** | " + " | ".join(cell(t) for t in totals) + " |")
    lines.append("| seconds | " + " | ".join(str(r["seconds"] or "-") for r in rows.values()) + " |")
    for label, row in rows.items():
        if row["failures"]:
            lines += ["", f"## Failing with the {label} set ({len(row['failures'])})", ""]
            lines += [f"- `{f['test']}`: {f['error']}" for f in row["failures"]]
        if row["pytest_rc"] not in (None, 0, 1):  # 1: tests failed; 2-5: interrupted, internal or usage error
            lines += ["", f"## {label}: pytest exited {row['pytest_rc']} (see runs/compat/{label}.log)"]
    markdown = "\n".join(lines) + "\n"
    out = ROOT / "docs" / "compat"
    out.mkdir(parents=True, exist_ok=True)
    (out / "newest.md").write_text(markdown)
    payload = {"date": date, "command": command, "latest_on_index": index, "rows": rows}
    (out / "newest.json").write_text(json.dumps(payload, indent=1) + "\n")
    return markdown


if __name__ == "__main__":
    verb, args = sys.argv[1], sys.argv[2:]
    if verb == "deps":
        print("\n".join(deps([a.lower() for a in args])))
    elif verb == "versions":
        print(json.dumps(versions()))
    elif verb == "latest":
        print(json.dumps(latest()))
    elif verb == "table":
        print(table(Path(args[0]), args[1]), end="")
    else:
        sys.exit(__doc__)
