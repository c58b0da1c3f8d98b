"""Which rank computes which chunk: a pure function of (chunk, rank, world size).

The image list is cut into chunks of ``batch`` consecutive images (the last may be
shorter); chunk ``c`` covers images ``[c * batch, min((c + 1) * batch, n))`` and is one
zarr chunk of every array, so a rank that owns a chunk owns those bytes alone.  Chunks
are dealt round-robin (``c % world == rank``): every chunk goes to exactly one rank and
nothing is padded or repeated, unlike ``DistributedSampler``, which pads the last
round with duplicates.  Because a chunk is always the same batch, results do not depend
on the number of processes.
"""

from __future__ import annotations

from typing import List, Tuple

__all__ = ["chunk_count", "chunk_bounds", "rank_chunks"]


def chunk_count(n: int, batch: int) -> int:
    """How many chunks of ``batch`` images cover ``n`` images."""
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}.")
    return (n + batch - 1) // batch


def chunk_bounds(chunk: int, n: int, batch: int) -> Tuple[int, int]:
    """``(start, stop)`` image indices of ``chunk``."""
    return chunk * batch, min((chunk + 1) * batch, n)


def rank_chunks(n_chunks: int, rank: int, world: int) -> List[int]:
    """The chunks rank ``rank`` of ``world`` computes: ``rank, rank + world, ...`` (disjoint, covering)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes.")
    return list(range(rank, n_chunks, world))
