"""The README and the documentation show what the code does."""

from pathlib import Path

import pytest

from excitation.fxpass.rules import rules_table
from excitation.runtimes import RUNTIMES, markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


DOCS = ROOT / "docs"


def test_docs_generate_the_runtimes_and_rules_tables():
    # The documentation includes both tables as generated at build time (docs/_ext/excitation_docs.py).
    assert "_generated/runtimes_table.md" in (DOCS / "runtimes.md").read_text()
    assert "_generated/rules_table.md" in (DOCS / "rules.md").read_text()


def test_a_runtimes_table_in_the_readme_is_current():
    if "| runtime | works | notes | test |" in README:
        assert markdown_table() in README, "regenerate it with: python -m excitation.runtimes"


def test_a_rules_table_in_the_readme_is_current():
    if rules_table().splitlines()[0] in README:
        assert rules_table() in README


def test_every_runtime_row_has_its_test():
    source = (ROOT / "tests" / "test_runtimes.py").read_text()
    for row in RUNTIMES:
        assert f"def {row.test}(" in source, row.test


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block == ['pip install -e . && excitation demo', 'pip install -e ".[dev]" && pytest -q']
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]" && pytest -q' in ci.splitlines()


def test_readme_api_example_runs():
    # The example as printed, with random weights and small images (no downloads here).
    code = README.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'weights="IMAGENET1K_V1"' in code and "224, 224" in code
    code = code.replace('weights="IMAGENET1K_V1"', "weights=None").replace("224, 224", "64, 64")
    code = code.replace("print(", "str(")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["pb"].shape == (4, 3, 64, 64)
    assert namespace["grid"].shape == (4, 3, 3, 64, 64)
    assert namespace["moved"].shape == (4, 3, 64, 64)
    report = namespace["excitation"].report(namespace["excited"])
    assert report.counts() == {"relu": 49, "max_pool2d": 1}
    assert "rewrote 49 relu, 1 max_pool2d sites" in str(report)
