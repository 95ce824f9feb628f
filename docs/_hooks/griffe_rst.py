"""Griffe extension: apply ``rst_markdown.rst_to_markdown`` to every docstring before mkdocstrings renders it.

See ``rst_markdown.py`` for what is rewritten. The conversion lives there, free of griffe, so
that the test-suite can check it without the docs dependencies installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import griffe


def _load_rst_markdown():
    spec = importlib.util.spec_from_file_location("rst_markdown", Path(__file__).with_name("rst_markdown.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rst_to_markdown = _load_rst_markdown().rst_to_markdown


class RstToMarkdown(griffe.Extension):
    """Apply :func:`rst_to_markdown` to every docstring griffe loads."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
