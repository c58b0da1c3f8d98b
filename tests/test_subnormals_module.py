"""excitation.subnormals: the counter against hand-made tensors, and the flush-to-zero measurement's bookkeeping."""

import torch

from excitation.bench import format_flush_note
from excitation.subnormals import SubnormalCounter, count_subnormals, flush_to_zero_cost, single_thread_flush

TINY = torch.finfo(torch.float32).tiny


def test_count_subnormals_counts_exactly_the_nonzero_values_below_the_smallest_normal():
    t = torch.tensor([0.0, TINY, TINY / 2, -TINY / 4, 1e-45, 1.0, -0.0])
    assert count_subnormals(t) == 3  # tiny/2, -tiny/4, 1e-45 (the smallest subnormal)
    assert count_subnormals(torch.tensor([TINY / 2], dtype=torch.float64)) == 0  # normal in float64


def test_the_counter_attributes_subnormals_to_the_op_that_made_them():
    x = torch.full((10,), TINY)
    with SubnormalCounter() as counter:
        y = x * 0.25  # 10 subnormals
        y.view(2, 5)  # a view: not counted again
        torch.empty(100)  # garbage, not a value
        z = y * 4  # back to normal
    assert counter.counts == {"aten.mul.Tensor": 10} and counter.total == 10
    assert torch.equal(z, x)


def test_single_thread_flush_sets_and_restores_the_state():
    threads = torch.get_num_threads()
    with single_thread_flush(True):
        assert torch.get_num_threads() == 1
        flushed = torch.full((4,), TINY) * 0.25
    assert torch.get_num_threads() == threads
    unflushed = torch.full((4,), TINY) * 0.25
    assert count_subnormals(unflushed) == 4
    if torch.set_flush_denormal(True):  # this CPU has the mode: it really flushed inside
        torch.set_flush_denormal(False)
        assert count_subnormals(flushed) == 0


def test_flush_to_zero_cost_measures_every_method_and_counts_its_subnormals():
    x = torch.full((1000,), TINY)
    cost = flush_to_zero_cost({"normal": lambda: x * 2, "underflows": lambda: x * 0.5}, rounds=2)
    assert set(cost.ms_off) == {"normal", "underflows"} and all(v > 0 for v in cost.ms_off.values())
    assert cost.subnormals == {"normal": 0, "underflows": 1000}
    assert (set(cost.ms_on) == set(cost.ms_off)) == cost.supported
    note = "\n".join(format_flush_note({"batch": 2, "rounds": 2, "supported": cost.supported, "ms_off": {"vanilla gradient": 2.0, "x": 3.0},
                                        "ms_on": {"vanilla gradient": 2.0, "x": 2.2}, "subnormals": {"vanilla gradient": 0, "x": 7}}))
    assert "| x | 7 | 1.500 | 1.100 |" in note and "| vanilla gradient | 0 | 1.000 | 1.000 |" in note
