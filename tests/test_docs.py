"""The documentation: it builds, it covers the API and the CLI, its examples run, and it states facts.

* tracked text holds no notes about how the work was organised (only what the code does);
* every name of ``excitation.__all__`` is in the API reference, every subcommand in the CLI reference;
* the ``>>>`` examples of the pages and of the public docstrings run;
* ``sphinx-build -W`` passes (needs the ``docs`` extra; skipped without it).
"""

from __future__ import annotations

import doctest
import inspect
import importlib
import importlib.util
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import excitation

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# ----------------------------------------------------------------------------- process notes
# Words that describe how the work was done rather than what the code does.
PROCESS_TALK = re.compile(
    r"\bsessions?\b|\bissues? ?#?\d+|\bissue #|\bno gpu was lent\b|\blent a gpu\b|\bis lent\b"
    r"|\bnot kept\b|\btried and (?:dropped|not kept)\b",
    re.IGNORECASE,
)
# Legitimate technical uses of those words, matched against the line.
ALLOWED = re.compile(
    r"scope=[\"']session[\"']|new_session|setsid|process (?:group|session)|its own session"
    r"|session[-_ ]scoped|\bSession\(",
    re.IGNORECASE,
)
# Files whose job is to name those words.
SELF = {"tests/test_docs.py"}
TEXT_SUFFIXES = {".py", ".md", ".rst", ".txt", ".sh", ".toml", ".cfg", ".cff", ".json", ".yml", ".yaml", ".c", ".h",
                 ".ini", ""}


def tracked_text_files():
    """Files git tracks, plus new files it does not ignore (so a file is checked before its first commit)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in sorted(set(listed)):
        path = ROOT / name
        if name in SELF or path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield name, text


def process_talk(name: str, text: str):
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        if PROCESS_TALK.search(ALLOWED.sub("", line)):
            hits.append(f"{name}:{number}: {line.strip()[:160]}")
    return hits


def test_the_check_finds_process_notes_and_allows_technical_words():
    assert process_talk("x.md", "Measured in session 4, no GPU was lent.\nSee issue 15.")
    assert process_talk("x.py", "# tried and not kept: a stacked softmax")
    assert not process_talk("x.py", '@pytest.fixture(scope="session")\nsubprocess.Popen(cmd, start_new_session=True)')
    assert not process_talk("x.py", "# the job runs in its own session, so its process group is killed at once")


def test_tracked_text_has_no_process_notes():
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    hits = []
    for name, text in tracked_text_files():
        if name == "README.md":
            continue  # test_readme_has_no_process_notes
        hits += process_talk(name, text)
    assert not hits, "describe what the code does, not how the work went:\n" + "\n".join(hits)


def test_readme_has_no_process_notes():
    hits = process_talk("README.md", (ROOT / "README.md").read_text())
    assert not hits, "\n".join(hits[:20])


# ----------------------------------------------------------------------------- machines in comments
# Comments say why; a number measured on one machine goes to docs/design-measurements.md with its machine.
MACHINE = re.compile(r"\b(?:EPYC|Xeon|H100|H200)\b")
# (file, substring of the line): docstrings about how machines are named in reports, not measurements.
MACHINE_ALLOWED = [("excitation/bench.py", 'cloud VMs report a bare "AMD EPYC"')]
_STATEMENT_START = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}


def comment_lines(source: str):
    """(line number, text) of every comment and of every docstring or other standalone string expression."""
    previous = tokenize.NEWLINE
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
        elif token.type == tokenize.STRING and previous in _STATEMENT_START:
            for offset, line in enumerate(token.string.splitlines()):
                yield token.start[0] + offset, line
        if token.type not in (tokenize.COMMENT, tokenize.NL):
            previous = token.type


def test_library_comments_name_no_machine():
    hits = []
    for path in sorted((ROOT / "excitation").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        for number, text in comment_lines(path.read_text(encoding="utf-8")):
            if MACHINE.search(text) and not any(name == f and s in text for f, s in MACHINE_ALLOWED):
                hits.append(f"{name}:{number}: {text.strip()[:160]}")
    assert not hits, ("comments say why; move a measured number with its machine to "
                      "docs/design-measurements.md:\n" + "\n".join(hits))


# ----------------------------------------------------------------------------- generated references
def docs_extension():
    spec = importlib.util.spec_from_file_location("excitation_docs", DOCS / "_ext" / "excitation_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_is_in_the_api_reference():
    listing = docs_extension().api_page()
    names = set(re.findall(r"^   (\w+)$", listing, re.MULTILINE))
    assert names == set(excitation.__all__)
    assert "_api_autosummary.rst" in (DOCS / "api.md").read_text()


def test_every_subcommand_is_in_the_cli_reference():
    from excitation.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    page = docs_extension().cli_page()
    for name, sub in subparsers.choices.items():
        assert f"## `excitation {name}`" in page, name
        assert sub.format_usage().split()[1] in page
    assert "_generated/cli.md" in (DOCS / "cli.md").read_text()


def test_every_page_is_in_a_toctree():
    pages = {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.glob("**/*.md")
             if not p.relative_to(DOCS).parts[0].startswith(("_", "bench", "evidence"))}
    listed = {"index"}
    for page in DOCS.glob("**/*.md"):
        for block in re.findall(r"```\{toctree\}\n(.*?)```", page.read_text(), re.DOTALL):
            base = page.parent.relative_to(DOCS)
            for entry in block.splitlines():
                if entry.strip() and not entry.startswith(":"):
                    listed.add((base / entry.strip()).as_posix())
    assert pages <= listed, sorted(pages - listed)


# ----------------------------------------------------------------------------- examples
PYCON = re.compile(r"```pycon\n(.*?)```", re.DOTALL)
DOC_PAGES = sorted(p for p in DOCS.glob("**/*.md") if PYCON.search(p.read_text()))
DOCTEST_MODULES = ["excitation", "excitation.api", "excitation.ascent", "excitation.calibrate",
                   "excitation.fxpass.backend", "excitation.fxpass.rewrite", "excitation.kernels.ops",
                   "excitation.quantus", "excitation.errors", "excitation.fxpass.options"]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_examples_run(page):
    # The ``pycon`` blocks of one page run in order in one namespace, as a reader would type them.
    source = "\n".join(PYCON.findall(page.read_text()))
    test = doctest.DocTestParser().get_doctest(source, {}, page.name, str(page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert test.examples and runner.failures == 0, f"{runner.failures} example(s) of {page.name} failed (see stdout)"


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples_run(name):
    importlib.import_module(name)
    module = sys.modules[name]  # excitation.calibrate is also a function of the package
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result


def test_documented_public_functions_have_the_numpy_sections():
    for name in ("pullback", "pullbacks", "gradient", "calibrate", "extract", "backend", "Normalized", "excite",
                 "excite_graph", "report", "is_excited", "prepare", "clear_cache", "ascend", "surrogate_relu",
                 "surrogate_max_pool2d", "quantus_explain_func"):
        obj = getattr(excitation, name)
        doc = obj.__doc__
        sections = ["Returns", "Raises", "Examples"]
        if inspect.signature(obj).parameters:
            sections.insert(0, "Parameters")
        for section in sections:
            assert f"\n    {section}\n    ---" in doc, (name, section)


# ----------------------------------------------------------------------------- the build
@pytest.mark.docs
def test_docs_build_with_warnings_as_errors(tmp_path):
    if importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_parser") is None:
        pytest.skip("needs the docs extra")
    out = tmp_path / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
               "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    api = (out / "api.html").read_text()
    for name in excitation.__all__:
        assert f"excitation.{name}" in api or name in api, name
        assert (out / "_generated" / "api" / f"excitation.{name}.html").exists(), name
    cli = (out / "cli.html").read_text()
    from excitation.cli import build_parser

    (subparsers,) = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    for name in subparsers.choices:
        assert f"usage: excitation {name}" in cli, name
    rules = (out / "rules.html").read_text()
    for rule in excitation.RULES:
        assert rule in rules, rule
