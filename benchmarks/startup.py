"""What the automatic registration costs at start-up: ``python -c pass`` and ``python -c 'import peft'`` with the
``duallora-autoload.pth`` that the package installs, against the same interpreter and ``sys.path`` without it.

    python benchmarks/startup.py [--runs 40]

"Without" is a bare venv of the same Python with this venv's ``.pth`` files but duallora's, and one more that adds
this venv's site-packages to ``sys.path``: Python runs ``.pth`` files only in site directories, so duallora's is
never run there, and everything else starts as here. The runs
alternate (with, without) so that a busy machine slows both alike. Writes ``docs/bench/startup.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import py_compile
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "bench"
PROGRAMS = {"python -c pass": "pass", "python -c 'import peft'": "import peft"}
RUNS = {"pass": 1, "import peft": 0.25}  # fraction of --runs: importing peft takes seconds, not milliseconds


def python_without_the_pth(folder: Path) -> str:
    """A venv whose sys.path is this one's, without processing this venv's .pth files."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    purelib = sysconfig.get_paths()["purelib"]
    site = Path(subprocess.run([str(folder / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "00-paths.pth").write_text(f"{ROOT / 'src'}\n{purelib}\n")  # "00": read before the copies below
    for other in Path(purelib).glob("*.pth"):  # the venv's other .pth files run there as here (setuptools' hack...)
        if other.name != "duallora-autoload.pth":
            (site / other.name).write_text(other.read_text())
    return str(folder / "bin" / "python")


def seconds(python: str, code: str) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([python, "-c", code], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def imported_ms(code: str, module: str, runs: int = 5) -> float:
    """Median cumulative import time of ``module`` in ``python -X importtime -c code`` (0 if never imported)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    times = []
    for _ in range(runs):
        log = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True, env=env,
                             capture_output=True, text=True).stderr
        lines = [line.split("|") for line in log.splitlines() if line.startswith("import time:")]
        times.append(next((int(cells[1]) / 1000 for cells in lines if cells[2].strip() == module), 0.0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    # pip compiles an installed module to bytecode; an editable one is compiled on first import, unless
    # PYTHONDONTWRITEBYTECODE is set (it is on this project's machines): compile it, or every start compiles it
    py_compile.compile(str(ROOT / "src" / "duallora_autoload.py"),
                       cfile=importlib.util.cache_from_source(str(ROOT / "src" / "duallora_autoload.py")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        interpreters = {"with": sys.executable, "without": python_without_the_pth(Path(tmp) / "bare")}
        for label, code in PROGRAMS.items():
            runs = {name: [] for name in interpreters}
            count = max(3, round(args.runs * RUNS[code]))
            for _ in range(count):
                for name, python in interpreters.items():
                    runs[name].append(seconds(python, code))
            with_ms, without_ms = (1000 * statistics.median(runs[name]) for name in ("with", "without"))
            rows.append({"program": label, "with_ms": round(with_ms, 2), "without_ms": round(without_ms, 2),
                         "difference_ms": round(with_ms - without_ms, 2), "ratio": round(with_ms / without_ms, 3),
                         "runs": count, "duallora_autoload_ms": round(imported_ms(code, "duallora_autoload"), 2),
                         "duallora_ms": round(imported_ms(code, "duallora"), 1)})
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "startup.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    table = ["| program | with the .pth (median ms) | without (median ms) | difference (ms) | ratio | runs "
             "| importing duallora_autoload (ms) | importing duallora (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| `{r['program']}` | {r['with_ms']} | {r['without_ms']} | {r['difference_ms']:+} | {r['ratio']} "
              f"| {r['runs']} | {r['duallora_autoload_ms']} | {r['duallora_ms']} |" for r in rows]
    text = "\n".join(table) + ("\n\nalternating runs; the last two columns: cumulative times from `python -X "
                               "importtime`, median of 5; `python benchmarks/startup.py`\n")
    (DOCS / "startup.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
