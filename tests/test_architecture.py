"""The layout keeps the design: dependencies point one way (the application on the library, each method on the
shared core, never the other way), and docs/ARCHITECTURE.md names every module, so the picture cannot drift."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "duallora"

# what each part may import from the package (besides itself and the top-level __init__'s metadata)
ALLOWED = {"core": {"core"}, "dual": {"core", "dual"}, "d2": {"core", "d2"},
           "app": {"core", "dual", "d2", "app", ""}, "": {"core", "dual", "d2", "app", ""}}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def part(path: Path) -> str:
    relative = path.relative_to(PACKAGE).parts
    return relative[0] if len(relative) > 1 else ""


def imported_parts(path: Path) -> set[str]:
    """The parts of the package a module imports (relative imports resolved, ``duallora.x`` ones too)."""
    tree = ast.parse(path.read_text())
    package = list(path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [target + [alias.name] for alias in node.names]
            elif node.module and node.module.split(".")[0] == "duallora":
                names = [node.module.split(".")[1:]]
            else:
                continue
            for target in names:
                found.add(target[0] if target and (PACKAGE / target[0]).is_dir() else "")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "duallora":
                    parts = alias.name.split(".")[1:]
                    found.add(parts[0] if parts and (PACKAGE / parts[0]).is_dir() else "")
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_dependencies_point_one_way(path):
    mine = part(path)
    upward = imported_parts(path) - ALLOWED[mine]
    assert not upward, f"{path.relative_to(PACKAGE)} ({mine or 'top'}) imports from {sorted(upward)}"


def test_the_library_never_imports_the_application():
    for path in modules():
        if part(path) in ("core", "dual", "d2") or path.parent == PACKAGE and path.name == "__init__.py":
            assert "app" not in imported_parts(path), path


def test_the_architecture_document_names_every_module():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = []
    for path in modules():
        if path.name == "__init__.py" and path.parent != PACKAGE:
            continue
        name = path.name if path.parent.name != "tasks" else "tasks/"
        if name not in text:
            missing.append(str(path.relative_to(PACKAGE)))
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"
