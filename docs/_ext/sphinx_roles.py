"""A griffe extension for the API reference: the reST markup of smtpnotify's
docstrings (written to read well in ``help()``) turned into Markdown.

* ``:class:`~smtpnotify.MailConfig``` and the other Sphinx roles become code
  (`MailConfig`; ``~`` keeps the last name, methods and functions get ``()``);
* a paragraph ending in ``::`` ends in ``:``, so the indented block after it
  stays a code block;
* a run of ``>>>`` lines (a doctest) becomes a fenced ``pycon`` block.

Loaded by ``mkdocs.yml`` (``extensions`` of the mkdocstrings python handler).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(class|meth|func|attr|data|mod|exc|obj|const)"
    r":`(~?)([^`<]*?)\s*(?:<([^>`]+)>)?`"
)
_DOCTEST = re.compile(r"^(\s*)(>>>|\.\.\.)( |$)")


def _role(match: re.Match[str]) -> str:
    role, tilde, text, target = match.groups()
    if not target:
        text = text.rsplit(".", 1)[-1] if tilde else text
        if role in ("meth", "func") and not text.endswith(")"):
            text += "()"
    return f"`{text}`"


def _fence_doctests(lines: list[str]) -> list[str]:
    out: list[str] = []
    in_doctest = False
    indent = ""
    for line in lines:
        start = _DOCTEST.match(line)
        if not in_doctest and start and start.group(2) == ">>>":
            in_doctest, indent = True, start.group(1)
            out.append(f"{indent}```pycon")
        elif in_doctest and not line.strip():
            out.append(f"{indent}```")
            in_doctest = False
        out.append(line)
    if in_doctest:
        out.append(f"{indent}```")
    return out


def to_markdown(text: str) -> str:
    """``text`` (a docstring) with its reST markup replaced by Markdown."""
    text = _ROLE.sub(_role, text)
    lines = []
    for line in text.split("\n"):
        stripped = line.rstrip()
        if stripped.endswith("::") and not stripped.endswith(":::"):
            body = stripped[:-2].rstrip()
            line = f"{body}:" if body.strip() else ""
        lines.append(line)
    return "\n".join(_fence_doctests(lines))


class SphinxRolesToMarkdown(griffe.Extension):
    """Rewrite every docstring with :func:`to_markdown` as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called by griffe for each object it loads."""
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
