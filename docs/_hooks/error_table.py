"""MkDocs hook: render every error message the library can raise into the Troubleshooting page.

The page ``troubleshooting.md`` contains the line ``<!-- error-table -->``; at build time that
line (the marker alone on a line; a mention inside a sentence is left as it is) is replaced by
one table row per exception constructed in ``engm_opacus/`` (``raise X("...")`` or
``return X("...")`` with ``X`` an exception class and a literal or f-string message). The
message is split at ``"Fix:"`` into the problem and its fix, so the page is current with the
code on every build and cannot drift.
"""

from __future__ import annotations

import ast
import builtins
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

MARKER = "<!-- error-table -->"
PACKAGE = Path(__file__).resolve().parents[2] / "engm_opacus"


@dataclass(frozen=True)
class ErrorSite:
    """One exception the library constructs: its type, message template, and where."""

    exception: str
    message: str
    module: str
    function: str
    line: int

    @property
    def problem(self) -> str:
        return self.message.split("Fix:", 1)[0].strip()

    @property
    def fix(self) -> str:
        parts = self.message.split("Fix:", 1)
        return parts[1].strip() if len(parts) == 2 else ""


def string_constants(tree: ast.Module) -> Dict[str, Tuple[str, ...]]:
    """Module-level ``NAME = ("a", "b")`` (annotated or not): tuples/lists of string literals by name."""
    constants: Dict[str, Tuple[str, ...]] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        if isinstance(target, ast.Name) and isinstance(value, (ast.Tuple, ast.List)):
            items = [e.value for e in value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(items) == len(value.elts):
                constants[target.id] = tuple(items)
    return constants


def placeholder(expression: ast.expr, constants: Dict[str, Tuple[str, ...]]) -> str:
    """The text for one ``{...}`` field of an f-string.

    ``", ".join(NAME)`` of a module-level tuple of strings is spelled out (the valid choices);
    a name or attribute stays a named placeholder (``{gamma}``, ``{self.jobs}``); anything
    more complex becomes ``{...}``.
    """
    if (
        isinstance(expression, ast.Call)
        and isinstance(expression.func, ast.Attribute)
        and expression.func.attr == "join"
        and isinstance(expression.func.value, ast.Constant)
        and len(expression.args) == 1
        and isinstance(expression.args[0], ast.Name)
        and expression.args[0].id in constants
    ):
        return expression.func.value.value.join(constants[expression.args[0].id])
    simple = isinstance(expression, ast.Name) or (
        isinstance(expression, ast.Attribute) and isinstance(expression.value, ast.Name)
    )
    return "{" + ast.unparse(expression) + "}" if simple else "{...}"


def message_template(node: ast.expr, constants: Optional[Dict[str, Tuple[str, ...]]] = None) -> Optional[str]:
    """The literal text of a str / f-string / ``+``-concatenation, with ``{expr}`` for each placeholder."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        out = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                out.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                out.append(placeholder(value.value, constants or {}))
        return "".join(out)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = message_template(node.left, constants), message_template(node.right, constants)
        return None if left is None or right is None else left + right
    return None


def is_exception_name(name: str) -> bool:
    builtin = getattr(builtins, name, None)
    return (isinstance(builtin, type) and issubclass(builtin, BaseException)) or name.endswith("Error")


def error_sites_in(path: Path, package_root: Path) -> Iterable[ErrorSite]:
    """Every exception constructed with a message in the module at ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts).removesuffix(".__init__")
    constants = string_constants(tree)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and is_exception_name(node.func.id)):
            continue
        if not node.args:
            continue
        message = message_template(node.args[0], constants)
        if message is None:
            continue
        scope, function = node, "<module>"
        while scope in parents:
            scope = parents[scope]
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                function = scope.name if function == "<module>" else f"{scope.name}.{function}"
        yield ErrorSite(node.func.id, " ".join(message.split()), module, function, node.lineno)


def all_error_sites(package_root: Path = PACKAGE) -> List[ErrorSite]:
    """Every error site of the package, sorted by module and line."""
    sites = [site for path in sorted(package_root.rglob("*.py")) for site in error_sites_in(path, package_root)]
    return sorted(sites, key=lambda s: (s.module, s.line))


def render_table(sites: List[ErrorSite]) -> str:
    """An HTML table (messages escaped verbatim) with one row per error site."""
    rows = "\n".join(
        "<tr>"
        f"<td><code>{html.escape(s.exception)}</code><br><small>{html.escape(s.module)}.<br>{html.escape(s.function)}</small></td>"
        f"<td>{html.escape(s.problem)}</td>"
        f"<td>{html.escape(s.fix) or '&mdash;'}</td>"
        "</tr>"
        for s in sites
    )
    return (
        '<div class="error-table"><table>\n'
        "<thead><tr><th>Raised</th><th>Message</th><th>Fix</th></tr></thead>\n"
        f"<tbody>\n{rows}\n</tbody>\n</table></div>"
    )


MARKER_LINE = re.compile(rf"^[ \t]*{re.escape(MARKER)}[ \t]*$", re.M)
"""The marker alone on its line (a mention of it in the text, e.g. in a code span, is left alone)."""


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - MkDocs hook signature
    """Replace the marker line with the current table."""
    if not MARKER_LINE.search(markdown):
        return markdown
    table = render_table(all_error_sites())
    return MARKER_LINE.sub(lambda _: table, markdown)
