"""Every ```python block in README.md and docs/*.md runs, as a reader would paste it.

A block whose first line is a comment starting ``# not run:`` is only
compiled (it needs a real mail server or network); every other block is
executed in a fresh namespace, in a temporary working directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks() -> list[object]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            found.append(pytest.param(page, line, match.group(1), id=f"{page.name}:{line}"))
    return found


BLOCKS = _blocks()


def test_the_docs_have_examples() -> None:
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize(("page", "line", "code"), BLOCKS)
def test_example_runs(
    page: Path, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = compile("\n" * (line - 1) + code, str(page), "exec")
    if code.lstrip().startswith("# not run:"):
        return
    monkeypatch.chdir(tmp_path)
    exec(compiled, {"__name__": f"docs_example_{page.stem}_{line}"})  # noqa: S102 - executing our own docs
