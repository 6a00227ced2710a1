"""open_clip's distributed SigLIP on top of an exchange.

Rank r's loss is open_clip's: its b images against every rank's texts, positives only in its own
block (pair i with text i of the same rank), the sum divided by b:

    loss_r = (1/b) sum_{i in r} sum_{j all} softplus(-y_ij S_ij)

open_clip passes the texts round with ``NeighbourExchange`` (or an all-reduce / all-gather) *with*
grad, so the gradient of T_r sums every rank's loss: dT_r = sum_r' g_r' d loss_r'/dT_r, while
images, ``logit_scale`` and ``logit_bias`` get g_r d loss_r only (they are never exchanged). Every
exchange name it accepts ("bidir", "shift", "reduce", "gather") gives those same values and
gradients; fastclip runs "gather" and "reduce" as the gather exchange and "bidir", "shift" and
"ring" as the overlapped ring, whose per-rank memory does not grow with the world size.

``SigLipLossFunction`` calls the exchange itself (``siglip_sum`` forward, ``siglip_gradients``
backward): the SigLIP loss needs no more than the exchange gives, while CLIP's four conventions need
``DistributedClip`` (fastclip/distributed/clip.py) on top of it.
"""
from __future__ import annotations

SIGLIP_EXCHANGE_OF = {"gather": "gather", "reduce": "gather", "bidir": "ring", "shift": "ring", "ring": "ring"}
