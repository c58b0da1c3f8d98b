"""Pages generated from the code at build time, so they cannot drift from it.

* ``_generated/rules_table.md``: :func:`excitation.fxpass.rules.rules_table` (from ``excitation.RULES``);
* ``_generated/runtimes_table.md``: :func:`excitation.runtimes.markdown_table` (one test per row);
* ``_generated/cli.md``: ``format_help()`` of ``excitation.cli.build_parser()`` and of every subcommand;
* ``_api_autosummary.rst``: an autosummary over ``excitation.__all__``, included by ``api.md``
  and named in ``autosummary_generate`` (its stubs go to ``_generated/api/``).

The files are written on ``builder-inited``, before autosummary reads them, and only when their
content changes (so an incremental build does not rebuild every page).  All are git-ignored.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, List, Tuple

GENERATED = "_generated"
API_LIST = "_api_autosummary.rst"


def cli_parsers() -> List[Tuple[str, argparse.ArgumentParser]]:
    """``[("excitation", parser), ("excitation demo", subparser), ...]`` in the parser's order."""
    from excitation.cli import build_parser

    parser = build_parser()
    out = [("excitation", parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((f"excitation {name}", sub))
    return out


def cli_page() -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at $COLUMNS: the same page on every terminal
    try:
        parts = [
            "# Command line\n",
            "Generated from `excitation.cli.build_parser()` when the documentation is built; "
            "`excitation COMMAND --help` prints the same text.\n",
        ]
        for name, parser in cli_parsers():
            parts.append(f"## `{name}`\n")
            if parser.description and name != "excitation":
                parts.append(parser.description.strip() + "\n")
            help_text = parser.format_help().rstrip()
            parts.append("```text\n" + help_text + "\n```\n")
        return "\n".join(parts)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def api_page() -> str:
    import excitation

    lines = [
        ".. currentmodule:: excitation",
        "",
        ".. autosummary::",
        "   :toctree: _generated/api",
        "   :nosignatures:",
        "",
    ]
    lines += [f"   {name}" for name in excitation.__all__]
    return "\n".join(lines) + "\n"


def pages() -> Dict[str, str]:
    from excitation.fxpass.rules import rules_table
    from excitation.runtimes import markdown_table

    return {
        "rules_table.md": rules_table() + "\n",
        "runtimes_table.md": markdown_table() + "\n",
        "cli.md": cli_page(),
    }


def write_pages(srcdir: Path) -> List[Path]:
    folder = srcdir / GENERATED
    folder.mkdir(exist_ok=True)
    written = []
    files = {folder / name: text for name, text in pages().items()}
    files[srcdir / API_LIST] = api_page()
    for path, text in files.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


_DATA_TYPES = (dict, tuple, list, str, frozenset, set)
_DATA_DOCS: Dict[str, List[str]] = {}


def data_docs() -> Dict[str, List[str]]:
    """The ``#:`` comment of every data name in ``excitation.__all__``, from the module defining it.

    The names are re-exported by ``excitation/__init__.py``, where autodoc finds no comment and
    would show the docstring of ``dict`` or ``tuple`` instead.
    """
    import sys

    import excitation
    from sphinx.pycode import ModuleAnalyzer

    found: Dict[str, List[str]] = {}
    for name in excitation.__all__:
        value = getattr(excitation, name)
        if not isinstance(value, _DATA_TYPES):
            continue
        for module in sorted(m for m in list(sys.modules) if m.startswith("excitation.")):
            if getattr(sys.modules[module], name, None) is not value:
                continue
            try:
                doc = ModuleAnalyzer.for_module(module).find_attr_docs().get(("", name))
            except Exception:  # pragma: no cover - a module without source
                doc = None
            if doc:
                found[name] = list(doc)
                break
        found.setdefault(name, [f"``{type(value).__name__}``; see the source of :mod:`excitation`.", ""])
    return found


def _on_process_docstring(app, what, name, obj, options, lines) -> None:
    if what in ("data", "attribute") and name.startswith("excitation."):
        short = name.split(".", 1)[1]
        if not _DATA_DOCS:
            _DATA_DOCS.update(data_docs())
        docs = _DATA_DOCS
        if short in docs:
            lines[:] = docs[short]


def _on_builder_inited(app) -> None:
    write_pages(Path(app.srcdir))


def setup(app):
    app.connect("builder-inited", _on_builder_inited, priority=100)  # before autosummary's (500)
    app.connect("autodoc-process-docstring", _on_process_docstring)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
