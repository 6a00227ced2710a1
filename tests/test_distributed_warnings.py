"""No deprecated torch.distributed call: every distributed loss mode runs in a 2-rank gloo world with
FutureWarning raised as an error (torch 2.14 warns on every rank, every call, for the old collective names)."""
import itertools
import warnings

import torch

from fastclip.distributed import count_communication
from fastclip.loss import ClipLoss, SigLipLoss
from fastclip.ops.options import CLIP_DIST_IMPLS, SIGLIP_DIST_IMPLS
from tests.distributed_utils import global_batch, local_rows, run_in_world


def _every_mode(rank: int, world_size: int) -> dict:
    warnings.simplefilter("error", FutureWarning)
    image, text = global_batch(world_size, 37, 200, seed=rank)
    image, text = local_rows(image, rank, world_size), local_rows(text, rank, world_size)
    losses = [ClipLoss(local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=world_size,
                       dist_impl=impl)
              for local, with_grad, impl in itertools.product((False, True), (False, True), CLIP_DIST_IMPLS)]
    losses += [SigLipLoss(rank=rank, world_size=world_size, dist_impl=impl) for impl in SIGLIP_DIST_IMPLS]
    names = set()
    for loss_fn in losses:
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
                  torch.tensor(10.0, requires_grad=True)]
        if isinstance(loss_fn, SigLipLoss):
            leaves.append(torch.tensor(-10.0, requires_grad=True))
        with count_communication() as counter:
            loss_fn(*leaves).backward()
        names |= set(counter.bytes_by_name())
    return {"names": names}


def test_distributed_losses_make_no_deprecated_collective_call():
    results = run_in_world(_every_mode, 2)
    names = results[0]["names"]
    assert names, "the losses communicated"
    assert not names & {"all_gather_into_tensor", "reduce_scatter_tensor"} or not hasattr(
        torch.distributed, "all_gather_single")
