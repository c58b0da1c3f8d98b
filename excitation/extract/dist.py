"""``torch.distributed`` for ``torchrun``: rank and world from the environment, gloo on the CPU, nccl on CUDA.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) the run is world size 1
and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, TypeVar

import torch
import torch.distributed as torch_dist

from ..errors import ExcitationError

__all__ = ["World", "init_world", "PeerLostError"]

T = TypeVar("T")


class PeerLostError(ExcitationError):
    """A collective failed because another rank of the job stopped (it was killed, or it failed)."""


@dataclass
class World:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _collective(self, what: str, call: Callable[[], T]) -> T:
        """Run ``call``; if a peer is gone, say so and what to do (gloo / nccl only name a socket)."""
        try:
            return call()
        except RuntimeError as exc:  # gloo raises a plain RuntimeError, nccl a DistError (a RuntimeError too)
            raise PeerLostError(
                f"rank {self.rank}/{self.world}: {what} failed, most likely because another process of the job "
                f"stopped ({exc}). The committed chunks are kept: rerun the same command to resume."
            ) from exc

    def barrier(self) -> None:
        if self.distributed:
            self._collective("the barrier", torch_dist.barrier)

    def gather(self, value: Any) -> List[Any]:
        """Every rank's ``value``, in rank order (on every rank)."""
        if not self.distributed:
            return [value]
        out: List[Any] = [None] * self.world
        self._collective("gathering every rank's results", lambda: torch_dist.all_gather_object(out, value))
        return out

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
            self.owns_group = False


def init_world(device: str) -> World:
    """Join the ``torchrun`` job described by ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return World()
    owns = False
    if not torch_dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    return World(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, owns)
