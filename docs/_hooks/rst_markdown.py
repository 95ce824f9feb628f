"""reST bits of the library's docstrings as Markdown (stdlib only; used by ``griffe_rst.py``).

* ``.. math::`` followed by an indented block becomes a ``$$ ... $$`` display-math block and the
  role ``:math:`x``` becomes ``$x$`` (``pymdownx.arithmatex`` marks both up and KaTeX renders
  them offline: see ``katex.py``);
* Sphinx roles ``:func:`a.b.c``` / ``:class:`~a.b.C``` become code spans
  (``a.b.c`` / ``C``: a leading ``~`` keeps the last component, as in Sphinx);
* a list item's continuation (reST indents it to the item's text, e.g. 3 spaces after ``1.``) is
  indented to the next multiple of 4 columns, as Markdown needs for a paragraph or a math block
  after a blank line to stay inside the item.
"""

from __future__ import annotations

import re
import textwrap
from typing import List

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([^`<>]+?)`")
MATH = re.compile(r"^(\s*)\.\. math::\s*$")
MATH_ROLE = re.compile(r":math:`([^`]+)`")
LIST_ITEM = re.compile(r"^(\s*)(?:\d+[.)]|[-*+])\s+(?=\S)")


def replace_role(match: re.Match) -> str:
    tilde, target = match.group(1), match.group(2).strip()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def replace_inline(line: str) -> str:
    """``:math:`x``` -> ``$x$``; other Sphinx roles -> code spans."""
    return ROLE.sub(replace_role, MATH_ROLE.sub(lambda m: f"${m.group(1).strip()}$", line))


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def widen_list_continuations(lines: List[str]) -> List[str]:
    """Shift the lines that continue a list item from its text column to the next multiple of 4."""
    out: List[str] = []
    column = None  # text column of the current list item
    loose = False  # the current item has a blank line inside: the next item needs one before it
    for line in lines:
        item = LIST_ITEM.match(line)
        if item:
            if loose and out and out[-1].strip():
                out.append("")
            column, loose = item.end(), False
            out.append(line)
        elif column is not None and line.strip() and indent_of(line) >= column:
            out.append(" " * (-column % 4) + line)
        else:
            if line.strip():
                column = None
            elif column is not None:
                loose = True
            out.append(line)
    return out


def rst_to_markdown(text: str) -> str:
    """Rewrite ``.. math::`` blocks as ``$$`` display-math blocks, ``:math:`` as ``$...$``, other roles as code spans."""
    lines = widen_list_continuations(text.splitlines())
    out: List[str] = []
    i = 0
    while i < len(lines):
        math = MATH.match(lines[i])
        if not math:
            out.append(replace_inline(lines[i]))
            i += 1
            continue
        indent = math.group(1)
        j = i + 1
        block: List[str] = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > len(indent)):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        body = textwrap.dedent("\n".join(block)).strip("\n")
        out += [f"{indent}$$", *(indent + line for line in body.splitlines()), f"{indent}$$", ""]
        i = j
    return "\n".join(out)
