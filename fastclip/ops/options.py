"""The options of one loss, as one frozen value: validated once, where the public API builds it, and
handed down whole to the autograd Function and the distributed layer (apple/ml-cross-entropy's
``CCEParams`` pattern). Nothing below the public API checks them again.

    ClipLoss(...)  / clip_loss(...)    -> ClipOptions
    SigLipLoss(...) / siglip_loss(...) -> SigLipOptions

What depends on the call's tensors (the backend that fits their device and dtype, the rank and world
size of the process group) is resolved per call in ``fastclip.loss``, not stored here.
"""
from __future__ import annotations

from dataclasses import dataclass

REDUCTIONS = ("mean", "sum", "none")
CLIP_DIST_IMPLS = ("gather", "ring")
SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather", "ring")


def _check_choice(name: str, value, allowed, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not {what}: choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ClipOptions:
    """Everything but the tensors that decides what ``ClipLoss`` computes."""

    local_loss: bool = False
    """open_clip's: each rank's loss is over its own pairs (with global statistics); else the global loss."""
    gather_with_grad: bool = False
    """open_clip's: gradients flow back through the gathered features to the ranks that own them."""
    rank: int | None = None
    """This process's rank in ``process_group``; None: the group's."""
    world_size: int | None = None
    """The size of ``process_group``; None: the group's (1 without torch.distributed)."""
    process_group: object = None
    """The torch.distributed group the ranks share; None: the default group."""
    dist_impl: str = "gather"
    """How ranks exchange features: "gather" (all-gather texts) or "ring" (P2P, memory flat in W)."""
    backend: str = "auto"
    """"auto" | "torch" | "triton" | "cuda" (fastclip.backends; checked when a call picks one)."""
    normalize: bool = False
    """L2-normalise both feature tensors inside the op, gradient included."""
    deterministic: bool = False
    """Ask for bitwise-repeatable results (a backend that cannot promise it is refused)."""
    reduction: str = "mean"
    """"mean" (open_clip's value), "sum", or "none" (this rank's (b,) per-pair losses)."""

    def __post_init__(self):
        _check_choice("dist_impl", self.dist_impl, CLIP_DIST_IMPLS, "a CLIP option")
        _check_choice("reduction", self.reduction, REDUCTIONS, "supported")


@dataclass(frozen=True)
class SigLipOptions:
    """Everything but the tensors that decides what ``SigLipLoss`` computes."""

    rank: int | None = None
    """This process's rank in ``process_group``; None: the group's."""
    world_size: int | None = None
    """The size of ``process_group``; None: the group's (1 without torch.distributed)."""
    process_group: object = None
    """The torch.distributed group the ranks share; None: the default group."""
    dist_impl: str = "bidir"
    """open_clip's "bidir", "shift", "reduce", "gather", or "ring": all give open_clip's values and
    gradients (fastclip.distributed.siglip says which exchange runs each)."""
    backend: str = "auto"
    """"auto" | "torch" | "triton" | "cuda" (fastclip.backends; checked when a call picks one)."""
    normalize: bool = False
    """L2-normalise both feature tensors inside the op, gradient included."""
    deterministic: bool = False
    """Ask for bitwise-repeatable results (every SigLIP path is; kept for the common signature)."""

    def __post_init__(self):
        _check_choice("dist_impl", self.dist_impl, SIGLIP_DIST_IMPLS, "a SigLIP option")
