"""Test-only fault injection: make one rank die like ``kill -9`` between a chunk's writes and its commit.

``EXCITATION_EXTRACT_TEST_DIE="RANK:K"`` makes rank ``RANK`` write the arrays of the
``K``-th chunk it computes (counting from 0), then ``os._exit(9)`` before committing it:
the worst moment for the store, since the arrays hold data that no marker vouches for.
``"RANK:K:after-others"`` first waits until every chunk of the *other* ranks is committed,
so that under ``torchrun`` the survivors are at (or entering) the final barrier when the
rank dies: the case where they could hang.  Unset (always, outside the tests), it does nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Optional

from . import store as _store

__all__ = ["TEST_DIE_ENV", "DieHook"]

TEST_DIE_ENV = "EXCITATION_EXTRACT_TEST_DIE"

#: How long a dying rank waits for the others' commits before it dies anyway (they may have failed).
_WAIT_S = 120.0


@dataclass(frozen=True)
class DieHook:
    """Where this process should die, if anywhere (see the module docstring)."""

    rank: int = -1
    after: int = -1
    wait_for_others: bool = False

    @classmethod
    def from_env(cls) -> "DieHook":
        text: Optional[str] = os.environ.get(TEST_DIE_ENV)
        if not text:
            return cls()
        parts = text.split(":")
        well_formed = len(parts) in (2, 3) and all(p.isdigit() for p in parts[:2]) and parts[2:] in ([], ["after-others"])
        if not well_formed:
            raise ValueError(f"{TEST_DIE_ENV}={text!r}: use RANK:K or RANK:K:after-others (a test-only hook; "
                             f"unset it).")
        return cls(int(parts[0]), int(parts[1]), len(parts) == 3)

    def maybe_die(self, out: Path, rank: int, computed: int, others: AbstractSet[int]) -> None:
        """Die if this is rank ``self.rank`` and it has committed ``self.after`` chunks in this run.

        ``others`` are the chunks the other ranks own; with ``wait_for_others`` they must be
        committed first.
        """
        if rank != self.rank or computed != self.after:
            return
        deadline = time.monotonic() + _WAIT_S
        while self.wait_for_others and not others <= _store.committed_chunks(out) and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(9)  # like kill -9: no commit, no cleanup, no exception handlers
