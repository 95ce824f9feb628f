"""reST bits of the library's docstrings as Markdown (stdlib only; used by ``griffe_rst.py``).

* ``.. math::`` followed by an indented block becomes a fenced ``latex`` code block
  (the site has no math renderer offline, so the formula is shown as LaTeX source);
* Sphinx roles ``:func:`a.b.c``` / ``:class:`~a.b.C``` become code spans
  (``a.b.c`` / ``C``: a leading ``~`` keeps the last component, as in Sphinx).
"""

from __future__ import annotations

import re
import textwrap
from typing import List

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([^`<>]+?)`")
MATH = re.compile(r"^(\s*)\.\. math::\s*$")


def replace_role(match: re.Match) -> str:
    tilde, target = match.group(1), match.group(2).strip()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def rst_to_markdown(text: str) -> str:
    """Rewrite ``.. math::`` blocks as fenced ``latex`` blocks and Sphinx roles as code spans."""
    lines = text.splitlines()
    out: List[str] = []
    i = 0
    while i < len(lines):
        math = MATH.match(lines[i])
        if not math:
            out.append(ROLE.sub(replace_role, lines[i]))
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
        out += [f"{indent}```latex", *(indent + line for line in body.splitlines()), f"{indent}```", ""]
        i = j
    return "\n".join(out)
