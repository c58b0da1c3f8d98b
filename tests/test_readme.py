"""The README shows what the code does today."""

from pathlib import Path

from excitation.runtimes import RUNTIMES, markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_runtimes_table_is_current():
    assert markdown_table() in README


def test_every_runtime_row_has_its_test():
    source = (ROOT / "tests" / "test_runtimes.py").read_text()
    for row in RUNTIMES:
        assert f"def {row.test}(" in source, row.test


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block == ['pip install -e . && excitation demo', 'pip install -e ".[dev]" && pytest -q']
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]" && pytest -q' in ci.splitlines()
