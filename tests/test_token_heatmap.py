"""excitation/token_heatmap.py: token scores as coloured HTML and terminal text."""

import re

import pytest
import torch

from excitation.token_heatmap import save_page, token_text, tokens_html, tokens_terminal


def _alphas(fragment):
    return [float(a) for a in re.findall(r"rgba\(\d+,\d+,\d+,([0-9.]+)\)", fragment)]


def test_colour_strength_is_the_score_over_the_largest_magnitude():
    fragment = tokens_html(["a", "b", "c", "d"], torch.tensor([1.0, -0.5, 0.25, 0.0]), title="t")
    assert _alphas(fragment) == pytest.approx([0.85, 0.425, 0.2125, 0.0], abs=1e-3)  # three decimals in the CSS
    colours = re.findall(r"rgba\((\d+),(\d+),(\d+),", fragment)
    assert colours[0] == ("214", "39", "40") and colours[1] == ("33", "102", "172")  # red +, blue -
    assert 'title="-0.5"' in fragment and "red +, blue" in fragment


def test_tokens_are_escaped_and_byte_level_marks_read_as_spaces():
    fragment = tokens_html(["<b>", "Ġworld"], [0.1, 0.2])
    assert "&lt;b&gt;" in fragment and "<b>" not in fragment
    assert token_text("Ġworld") == " world" and token_text("▁the") == " the"
    assert "red;" in fragment  # unsigned scores: one sequential scale


def test_mismatched_or_nan_scores_are_refused():
    with pytest.raises(ValueError, match="2 tokens but 3 scores"):
        tokens_html(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        tokens_terminal(["a"], [float("nan")])


def test_terminal_colours_and_plain_text(tmp_path):
    coloured = tokens_terminal(["x", "y"], [2.0, -1.0])
    assert coloured.count("\x1b[48;2;") == 2 and "\x1b[48;2;214;39;40m" in coloured  # full red for the peak
    assert tokens_terminal(["x", "y"], [2.0, -1.0], color=False) == "x[+2] y[-1]"
    page = save_page(tmp_path / "sub" / "p.html", [tokens_html(["a"], [1.0])], title="T & U")
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "<title>T &amp; U</title>" in text and "excitation-tokens" in text
