"""Every code block in ``docs/`` marked runnable is executed, so the docs cannot rot.

Convention (documented in ``docs/writing-docs.md``): the line ``<!-- runnable -->`` directly
above a fenced ``python`` block (blank lines in between are allowed; the marker may be
indented, e.g. inside a tab) marks that block as a self-contained script. Each is run in a
fresh namespace with ``__name__ == "__main__"`` and the working directory at the repository
root; any exception (including a failed ``assert``) fails its test.
"""

from __future__ import annotations

import linecache
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = re.compile(r"^(\s*)<!--\s*runnable\s*-->\s*$")
FENCE_OPEN = re.compile(r"^(\s*)```python\b.*$")


@dataclass(frozen=True)
class Snippet:
    """One runnable block: its page, the 1-based line of its opening fence, and its code."""

    page: Path
    line: int
    code: str

    @property
    def label(self) -> str:
        return f"{self.page.relative_to(DOCS)}:{self.line}"


def extract_snippets(page: Path) -> List[Snippet]:
    """The runnable blocks of ``page``; ``ValueError`` for a marker not followed by a python fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    snippets: List[Snippet] = []
    i = 0
    while i < len(lines):
        if not MARKER.match(lines[i]):
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        opening = FENCE_OPEN.match(lines[j]) if j < len(lines) else None
        if opening is None:
            raise ValueError(
                f"{page}:{i + 1}: '<!-- runnable -->' must be followed by a ```python block. "
                "Fix: put the marker directly above the block, or remove it."
            )
        indent = opening.group(1)
        k = j + 1
        while k < len(lines) and lines[k].strip() != "```":
            k += 1
        if k == len(lines) or not lines[k].startswith(indent):
            raise ValueError(f"{page}:{j + 1}: runnable block is not closed. Fix: end it with ``` at its indentation.")
        body = textwrap.dedent("\n".join(lines[j + 1 : k]))
        snippets.append(Snippet(page, j + 1, body + "\n"))
        i = k + 1
    return snippets


def all_snippets() -> List[Snippet]:
    return [s for page in sorted(DOCS.rglob("*.md")) for s in extract_snippets(page)]


SNIPPETS = all_snippets()


def test_docs_have_runnable_snippets_on_the_key_pages() -> None:
    pages = {s.page.relative_to(DOCS).as_posix() for s in SNIPPETS}
    for required in ("quickstart.md", "method.md", "coming-from-opacus.md", "switching-from-msgd.md"):
        assert required in pages, f"docs/{required} lost its runnable snippet"


def test_marker_without_python_block_is_rejected(tmp_path: Path) -> None:
    page = tmp_path / "bad.md"
    page.write_text("text\n<!-- runnable -->\n\n```bash\nls\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must be followed by a ```python block"):
        extract_snippets(page)


def test_extraction_dedents_blocks_inside_tabs(tmp_path: Path) -> None:
    page = tmp_path / "tabbed.md"
    page.write_text('=== "A"\n\n    <!-- runnable -->\n    ```python\n    x = 1\n    if x:\n        y = 2\n    ```\n', encoding="utf-8")
    (snippet,) = extract_snippets(page)
    assert snippet.code == "x = 1\nif x:\n    y = 2\n"
    assert snippet.line == 4


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.label for s in SNIPPETS])
def test_runnable_snippet_executes(snippet: Snippet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    filename = f"{snippet.page} (block at line {snippet.line})"
    linecache.cache[filename] = (len(snippet.code), None, snippet.code.splitlines(True), filename)  # readable tracebacks
    code = compile(snippet.code, filename, "exec")
    exec(code, {"__name__": "__main__"})  # noqa: S102 - executing our own documentation is the point


def load_hook(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, DOCS / "_hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_troubleshooting_table_lists_the_library_errors_with_their_fixes() -> None:
    hook = load_hook("error_table")
    page = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    assert hook.MARKER in page
    rendered = hook.on_page_markdown(page, None, None, None)
    assert hook.MARKER not in rendered
    mention = f"The line `{hook.MARKER}` is replaced."  # e.g. on the Writing docs page: left alone
    assert hook.on_page_markdown(mention, None, None, None) == mention
    sites = hook.all_error_sites()
    assert rendered.count("<tr><td>") == len(sites)
    by_function = {(s.module, s.function): s for s in sites}
    gamma = by_function[("engm_opacus.functional.normalization", "validate_gamma")]
    assert gamma.exception == "ValueError"
    assert gamma.problem.startswith("gamma must be a positive finite number, got {gamma}.")
    assert gamma.fix.startswith("pass e.g. gamma=1.0")
    unsupported = by_function[("engm_opacus.per_example.module", "unsupported_layers_error")]
    assert unsupported.problem.startswith("make_engm cannot compute per-example gradients for these trainable layers")
    assert unsupported.fix.startswith("build the model from these layers") and "register_rule" in rendered


def test_error_table_reads_fstrings_concatenation_and_returned_exceptions(tmp_path: Path) -> None:
    hook = load_hook("error_table")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text(
        "CHOICES = ('a', 'b')\n"
        "def f(x):\n"
        "    if x:\n"
        "        raise ValueError(f'bad {x!r} value {len(x)}. ' 'Fix: use 1.')\n"
        "    return KeyError('plain ' + f\"joined: {', '.join(CHOICES)}\")\n"
        "class C:\n"
        "    def g(self):\n"
        "        raise RuntimeError(message_variable)\n",
        encoding="utf-8",
    )
    sites = hook.all_error_sites(package)
    assert [(s.exception, s.function, s.problem, s.fix) for s in sites] == [
        ("ValueError", "f", "bad {x} value {...}.", "use 1."),
        ("KeyError", "f", "plain joined: a, b", ""),
    ]


def test_rst_math_and_roles_become_markdown() -> None:
    rst_to_markdown = load_hook("rst_markdown").rst_to_markdown
    text = (
        "Weights.\n\n.. math::\n\n    w_i = \\frac{1}{\\max(n_i, \\gamma)} \\\\\n    d = w g\n\n"
        "See :func:`engm_opacus.step.train_step` and :class:`~engm_opacus.optimizer.ENGMOptimizer`; :math:`n_i \\le \\gamma`."
    )
    assert rst_to_markdown(text) == (
        "Weights.\n\n$$\nw_i = \\frac{1}{\\max(n_i, \\gamma)} \\\\\nd = w g\n$$\n\n"
        "See `engm_opacus.step.train_step` and `ENGMOptimizer`; $n_i \\le \\gamma$."
    )
    indented = rst_to_markdown("1. step\n\n   .. math::\n\n       v = g\n\n   then\n2. next")
    assert indented == "1. step\n\n    $$\n    v = g\n    $$\n\n    then\n\n2. next"  # Markdown's 4-column continuation


def test_docstring_math_renders_as_katex_markup_inside_and_outside_lists() -> None:
    """What the site's Markdown (pymdownx.arithmatex, generic) makes of converted docstrings: math markup, in the list item."""
    markdown = pytest.importorskip("markdown")
    pytest.importorskip("pymdownx")
    rst_to_markdown = load_hook("rst_markdown").rst_to_markdown
    text = (
        "Steps:\n\n1. ascent\n2. perturbation\n\n   .. math::\n\n       v_W = \\gamma \\, \\|W\\|\n\n"
        "   added to the weights;\n3. restore\n\nInline :math:`n_i \\le \\gamma`."
    )
    html = markdown.markdown(rst_to_markdown(text), extensions=["pymdownx.arithmatex"], extension_configs={"pymdownx.arithmatex": {"generic": True}})
    assert '<div class="arithmatex">\\[\nv_W = \\gamma \\, \\|W\\|\n\\]</div>' in html  # the TeX untouched by Markdown escapes
    assert html.index("<li>") < html.index('class="arithmatex"') < html.index("added to the weights") < html.index("restore") < html.index("</ol>")
    assert "<li>\n<p>restore</p>\n</li>" in html  # its own item, not a line of the previous one
    assert html.count("<ol>") == 1 and '<span class="arithmatex">\\(n_i \\le \\gamma\\)</span>' in html


def undocumented_public_objects() -> set:
    """Modules, and public classes, functions and methods defined in the package, without a docstring."""
    import importlib
    import inspect
    import pkgutil

    import engm_opacus

    missing = set()
    for info in pkgutil.walk_packages(engm_opacus.__path__, "engm_opacus."):
        if info.name.endswith(".__main__"):  # importing it runs the command line
            continue
        module = importlib.import_module(info.name)
        if not (module.__doc__ or "").strip():
            missing.add(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) and not (obj.__doc__ or "").strip():
                missing.add(f"{info.name}.{name}")
            if inspect.isclass(obj):
                if not (obj.__doc__ or "").strip():
                    missing.add(f"{info.name}.{name}")
                for member_name, member in vars(obj).items():
                    function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                    if member_name.startswith("_") or not inspect.isfunction(function):
                        continue
                    if not (function.__doc__ or "").strip():
                        missing.add(f"{info.name}.{name}.{member_name}")
    return missing


def test_every_public_function_and_class_has_a_docstring() -> None:
    missing = sorted(undocumented_public_objects())
    assert not missing, f"public objects without a docstring (the API reference is built from them): {missing}"
