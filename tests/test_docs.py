"""The documentation is tested: every Python block in README.md and docs/ runs (or says, in a comment just above it,
why it cannot: ``<!-- not runnable: REASON -->``), every relative link resolves, every ``duallora`` command shown
parses, and the README stays short."""

import re
import shlex
from pathlib import Path

import pytest

from duallora.app.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUNNABLE = re.compile(r"<!-- not runnable: (.+?) -->\s*$")
# blocks that take long (the embedded SmolLM2 and its compiled kernels): in the slow set, which CI runs too
SLOW_BLOCKS = {("README.md", 0)}


def fenced_blocks(page: Path, language: str) -> list[tuple[int, str, str]]:
    """``(index, reason-not-runnable or "", code)`` of each block of ``language`` in ``page``."""
    lines, blocks, i = page.read_text().split("\n"), [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            mark = NOT_RUNNABLE.match(lines[i - 1].strip()) if i else None
            blocks.append((len(blocks), mark.group(1) if mark else "", "\n".join(lines[start:end])))
            i = end
        i += 1
    return blocks


def python_blocks():
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        for index, reason, code in fenced_blocks(page, "python"):
            marks = [pytest.mark.slow] if (name, index) in SLOW_BLOCKS else []
            yield pytest.param(name, index, reason, code, id=f"{name}[{index}]", marks=marks)


@pytest.mark.parametrize("page, index, reason, code", python_blocks())
def test_every_python_block_runs_or_says_why_not(page, index, reason, code, tmp_path, monkeypatch):
    if reason:
        assert len(reason) > 20, f"{page} block {index}: say why it cannot run, and what runs it instead"
        return
    monkeypatch.chdir(tmp_path)  # blocks that save write here
    exec(compile(code, f"{page} (python block {index})", "exec"), {"__name__": "__docs__"})


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^(https?:|mailto:|#)", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def shown_commands() -> list[tuple[str, list[str]]]:
    """Every ``duallora ...`` command in a bash or plain code block, as argv (continuation lines joined; ``[...]``
    optional parts, ``...`` and comments dropped; ``torchrun ... -m duallora`` and ``accelerate launch ... -m
    duallora`` reduced to duallora's part)."""
    commands = []
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```(?:bash|sh|)\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").split("\n"):
                line = line.split(" #", 1)[0].strip()
                match = re.search(r"(?:^|-m )duallora(\s.*)?$", line)
                if not match or line.startswith("pip "):
                    continue
                rest = re.sub(r"\[[^\]]*\]", "", match.group(1) or "").replace("...", "")
                commands.append((f"{page.relative_to(ROOT)}: {line}", shlex.split(rest)))
    return commands


COMMANDS = shown_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 15  # the extraction finds them (a regex that matched nothing would pass all below)


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_duallora_command_shown_parses(where, argv):
    if not argv:
        return  # `duallora` alone: the embedded default
    if argv[0] == "quick":
        argv = argv[1:]
        if not argv:
            return
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: does not parse (exit {exit_.code})")


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024
