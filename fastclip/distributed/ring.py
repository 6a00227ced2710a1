"""A ring of P2P block exchanges overlapped with compute, with partial results routed back to owners.

Rank r starts with its own block (its texts plus a few O(b) vectors). At step k = 0 .. W-1 it holds
the block of owner (r - k) mod W and, *before* computing on it, posts the asynchronous send of that
block to its right neighbour and the receive of the next one from its left: the transfer runs under
the compute. ``visit(owner, block)`` may return a contribution for the block's owner (a partial
column statistic, a partial text gradient); contributions travel right one step behind the blocks,
merged by each rank on the way, and arrive at their owner after W - 1 hops:

    step k:   wait block k | post send/recv of block k+1 | visit(block k) | wait partial | merge | post it

Memory on a rank: about four blocks and two partials, whatever W is. Traffic per rank: (W - 1)
blocks plus (W - 1) partials, which equals a ring all-gather plus a ring reduce-scatter.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from fastclip.distributed.comm import World

BLOCK_TAG = 100  # gloo matches P2P messages by (peer, tag): blocks and partials never mix up
PARTIAL_TAG = 200


class _InFlight:
    """Works of one batch_isend_irecv and the tensors they use (kept alive until waited)."""

    def __init__(self, works, tensors):
        self.works, self.tensors = works, tensors

    def wait(self) -> None:
        for work in self.works:
            work.wait()


class Ring:
    def __init__(self, world: World):
        self.world = world
        self.right = world.global_rank((world.rank + 1) % world.size)
        self.left = world.global_rank((world.rank - 1) % world.size)

    def _post(self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], tag: int) -> _InFlight:
        group = self.world.group
        ops = [dist.P2POp(dist.isend, tensor, self.right, group, tag + slot) for slot, tensor in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, tensor, self.left, group, tag + slot) for slot, tensor in enumerate(recvs)]
        return _InFlight(dist.batch_isend_irecv(ops), [*sends, *recvs])

    def run(self, block: Sequence[torch.Tensor],
            visit: Callable[[int, list[torch.Tensor]], list[torch.Tensor] | None],
            merge: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]] | None = None,
            wire_dtypes: Sequence[torch.dtype] | None = None) -> list[torch.Tensor] | None:
        """Visit every rank's block once; return this rank's contributions merged over all ranks.

        block: this rank's tensors (same shapes and dtypes on every rank).
        visit(owner, block) -> contributions for ``owner`` (accumulation dtype) or None (nothing routed).
        merge(received, local) -> merged contributions (accumulation dtype); ``received`` arrives
        in ``wire_dtypes`` (e.g. the features' dtype for gradients, as a reduce-scatter would send).
        """
        world = self.world
        current = [tensor.contiguous() for tensor in block]
        if world.size == 1:
            contribution = visit(world.rank, current)
            return contribution
        block_flight = partial_flight = None
        own = received = None
        for step in range(world.size):
            owner = (world.rank - step) % world.size
            if block_flight is not None:
                block_flight.wait()
                current = incoming
            block_flight = None
            if step < world.size - 1:
                incoming = [torch.empty_like(tensor) for tensor in current]
                block_flight = self._post(current, incoming, BLOCK_TAG)
            contribution = visit(owner, current)
            if contribution is None:
                continue
            if step == 0:
                own = contribution  # stays here; everyone else's partials for this block come round
                continue
            if partial_flight is not None:
                partial_flight.wait()
                contribution = merge(received, contribution)
            outgoing = [c.to(dtype).contiguous() for c, dtype in zip(contribution, wire_dtypes)]
            received = [torch.empty_like(tensor) for tensor in outgoing]
            partial_flight = self._post(outgoing, received, PARTIAL_TAG)
        if own is None:
            return None
        partial_flight.wait()
        return merge(received, own)
