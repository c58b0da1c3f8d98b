"""Subnormal floats: count them op by op, and measure what they cost on this CPU.

Why this module: arithmetic on subnormal floats takes a microcode assist per element on many
x86 cores, enough to multiply the time of a naive soft-gate pullback, which flush-to-zero
recovers (measured in docs/design-measurements.md), while other CPUs barely notice.  A
*count* of subnormals is the same on every machine, so tests assert counts
(:class:`SubnormalCounter`), and ``excitation bench`` reports the cost on the machine it runs on
(:func:`flush_to_zero_cost`).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["SubnormalCounter", "count_subnormals", "FlushCost", "flush_to_zero_cost", "single_thread_flush"]

# Ops that return uninitialised memory: their garbage is no computed value.
_UNINITIALISED = frozenset("empty empty_like new_empty empty_strided new_empty_strided resize_ set_".split())


def count_subnormals(t: Tensor) -> int:
    """How many elements of ``t`` are nonzero and below its dtype's smallest normal."""
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


class SubnormalCounter(TorchDispatchMode):
    """Counts the subnormal floats in the outputs of every ATen op that runs inside it.

    Skipped: ops that return uninitialised memory (``empty`` and friends) and returns that are
    views of an input (counted where they were computed).  ``counts`` maps op names to
    subnormals, ``values`` is the number of floats inspected.  Independent of the CPU: it counts
    values, not time.  Ops that C kernels run outside ATen are not seen (check their results).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Dict[str, int] = {}
        self.values = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._opname in _UNINITIALISED:
            return out
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for spec, tensor in zip(func._schema.returns, outputs):
            if spec.alias_info is not None and not spec.alias_info.is_write:
                continue
            for t in tree_flatten(tensor)[0]:
                if isinstance(t, Tensor) and t.is_floating_point() and t.numel():
                    n = count_subnormals(t)
                    self.values += t.numel()
                    if n:
                        self.counts[str(func)] = self.counts.get(str(func), 0) + n
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextmanager
def single_thread_flush(enabled: bool) -> Iterator[None]:
    """One intra-op thread with flush-to-zero on or off; both restored on exit.

    ``torch.set_flush_denormal`` reaches only the calling thread, so the measurement runs on
    one thread (with one thread, every kernel runs on the caller).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.set_flush_denormal(enabled)
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


@dataclass
class FlushCost:
    """Median single-thread milliseconds per method with flush-to-zero off and on, and subnormal counts."""

    rounds: int
    supported: bool  # whether this CPU has a flush-to-zero mode torch can set
    ms_off: Dict[str, float] = field(default_factory=dict)
    ms_on: Dict[str, float] = field(default_factory=dict)
    subnormals: Dict[str, int] = field(default_factory=dict)  # subnormal outputs of ATen ops, one call

    def ratio(self, method: str, baseline: str, on: bool = False) -> float:
        times = self.ms_on if on else self.ms_off
        return times[method] / times[baseline]


def flush_to_zero_cost(methods: Dict[str, Callable[[], object]], rounds: int = 3) -> FlushCost:
    """Time every method on one thread with flush-to-zero off, then on, interleaved round by round.

    ``methods`` maps names to zero-argument callables (one pullback each).  Each is also run once
    under a :class:`SubnormalCounter`.  Rounds alternate the two modes so drift hits both alike.
    """
    supported = torch.set_flush_denormal(True)
    torch.set_flush_denormal(False)
    times: Dict[bool, Dict[str, List[float]]] = {False: {m: [] for m in methods}, True: {m: [] for m in methods}}
    subnormals = {}
    for name, fn in methods.items():
        with single_thread_flush(False):
            fn()  # warm-up
            counter = SubnormalCounter()
            with counter:
                fn()
            subnormals[name] = counter.total
    for _ in range(rounds):
        for ftz in (False, True) if supported else (False,):
            with single_thread_flush(ftz):
                for name, fn in methods.items():
                    start = time.perf_counter()
                    fn()
                    times[ftz][name].append(time.perf_counter() - start)
    median = lambda ts: 1e3 * statistics.median(ts)
    return FlushCost(
        rounds=rounds, supported=supported,
        ms_off={m: median(t) for m, t in times[False].items()},
        ms_on={m: median(t) for m, t in times[True].items()} if supported else {},
        subnormals=subnormals,
    )
