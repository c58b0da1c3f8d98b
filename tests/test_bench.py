"""excitation.bench: the table's content and notes (timings themselves are benchmarks, never asserted)."""

import json

from excitation.bench import TF32_NOTE, BenchResult, BenchRow, format_table, run_bench


def _result(device="cpu", tf32=None):
    rows = [
        BenchRow("vanilla gradient", 10.0, 9.0, 11.0, 100.0, 1.0, 50.0, 1.0, 3.0, False),
        BenchRow("excitation (ours)", 12.0, 11.0, 13.0, 83.3, 1.2, 60.0, 1.2, 0.0, True),
        BenchRow("zennit BetaSmooth", note="fails: RuntimeError: boom"),
    ]
    return BenchResult("m", 8, 224, device, 0.3, "2.x", "2026-11-26", "box", "kind", rows, tf32)


def test_table_rows_and_the_tf32_note_only_where_tf32_ran():
    table = format_table(_result())
    assert "| excitation (ours) | 12.0 (11.0–13.0) | 83.3 | 1.200 | 60 | 1.200 | yes |" in table
    assert "| vanilla gradient |" in table and "no (rel. diff 3)" in table
    assert "| zennit BetaSmooth | fails: RuntimeError: boom |" in table
    assert TF32_NOTE not in table
    assert TF32_NOTE in format_table(_result("cuda", tf32=True))
    assert TF32_NOTE not in format_table(_result("cuda", tf32=False))


def test_run_bench_measures_every_method_against_its_own_baseline():
    result = run_bench("resnet18", batch=1, size=32, repeats=2, warmup=1, peers=False, progress=False)
    rows = {row.method: row for row in result.rows}
    assert rows["vanilla gradient"].ratio == 1.0 and rows["excitation (ours)"].equals_ours
    assert not rows["vanilla gradient"].equals_ours  # the pullback is not the gradient
    # resnet18's ReLUs all fuse with their BatchNorm: the unfused pass keeps more, the compact gate less than that.
    assert rows["excitation (ours)"].memory_mb <= rows["vanilla gradient"].memory_mb
    assert rows["excitation (ours)"].memory_mb < rows["excitation (ours), unfused"].memory_mb
    assert rows["excitation (ours), unfused, uint8 saved gate"].memory_mb < rows["excitation (ours), unfused"].memory_mb
    assert result.tf32 is None and json.loads(result.to_json())["model"] == "resnet18"
    # The flush-to-zero footnote: one-thread times for vanilla, ours and the paper-style surrogate.
    flush = result.flush_to_zero
    assert set(flush["ms_off"]) == {"vanilla gradient", "excitation (ours)", "paper-style: nn.ReLU -> autograd.Function"}
    assert flush["subnormals"]["vanilla gradient"] == 0 and flush["subnormals"]["excitation (ours)"] == 0
    assert "Subnormal floats on this CPU" in format_table(result)
