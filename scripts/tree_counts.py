"""The structure's counts, for a before/after: flat modules, layer folders, the largest modules,
functions over 60 lines, README characters.

    .venv/bin/python scripts/tree_counts.py [CHECKOUT]     # default: this checkout
    git worktree add /tmp/before <rev> && .venv/bin/python scripts/tree_counts.py /tmp/before
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LONG = 60  # lines: a function longer than this is listed


def main(root: Path) -> None:
    package = root / "pipeline"
    modules = [p for p in package.rglob("*.py") if "assets" not in p.parts]
    flat = sorted(p.name for p in package.glob("*.py"))
    folders = sorted(p.name for p in package.iterdir() if (p / "__init__.py").is_file())
    long = sorted(
        f"{p.relative_to(root)}:{node.name} ({node.end_lineno - node.lineno + 1})"
        for p in modules
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > LONG
    )
    largest = sorted(len(p.read_text().splitlines()) for p in modules)[-6:]
    print(f"flat modules: {len(flat)} ({' '.join(flat)})")
    print(f"folders: {len(folders)} ({' '.join(folders)})")
    print(f"modules: {len(modules)}; the six largest, in lines: {largest}")
    print(f"functions over {LONG} lines: {len(long)} ({', '.join(long)})")
    print(f"README characters: {len((root / 'README.md').read_text())}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
