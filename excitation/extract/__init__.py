"""Dataset scale: ``excitation extract`` / :func:`extract` over a whole image collection, and :func:`load_extract`.

Rooms: :mod:`.sharding` (who computes which chunk), :mod:`.dist` (torchrun / torch.distributed),
:mod:`.store` (the zarr v3 store, commits, the reader), :mod:`.run` (the loop), :mod:`.cli`,
:mod:`.faults` (the test-only kill hook).
"""

from .run import ExtractResult, extract, parse_targets
from .sharding import chunk_bounds, chunk_count, rank_chunks
from .store import Extract, ExtractStoreError, load_extract

__all__ = ["extract", "load_extract", "Extract", "ExtractResult", "ExtractStoreError", "parse_targets",
           "chunk_bounds", "chunk_count", "rank_chunks"]
