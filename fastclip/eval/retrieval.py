"""Image<->text retrieval recall@k (CLIP paper, section 3.2 / open_clip's ``get_clip_metrics``).

What counts as a hit (:data:`MATCH_RULE`, the one definition ``fastclip eval --task retrieval``, the
trainer's ``--val-data`` report and the embedded set's table all use): the query's own pair, as in
CLIP_benchmark and open_clip, except that pairs whose captions are the same string count as one, since
any text encoder gives identical captions identical features and so cannot rank one above the other.
Captions that only describe the same attributes in other words are different captions.

Plain PyTorch (one caption per image, pair i matches i)::

    similarity = image_features @ text_features.T
    rank_of_match = (similarity.argsort(dim=1, descending=True) == torch.arange(N)[:, None]).nonzero()[:, 1]
    recall_at_k = (rank_of_match < k).float().mean()
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from fastclip.eval.features import encode_texts

MATCH_RULE = "a hit is the query's own pair; pairs with identical captions count as one"


def _recall(similarity: torch.Tensor, query_groups: torch.Tensor, item_groups: torch.Tensor,
            ks: Sequence[int]) -> dict:
    """For each query (row), is an item of the same group among the top k? similarity: (Q, I)."""
    ranked = similarity.topk(min(max(ks), similarity.shape[1]), dim=1).indices  # (Q, kmax)
    hits = item_groups[ranked] == query_groups[:, None]
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     groups: torch.Tensor | None = None) -> dict:
    """Recall@k both ways for N aligned pairs: {"image_to_text_R@1": ..., "text_to_image_R@1": ...}.

    image_features, text_features: (N, E) normalised, row i of each forming pair i. ``groups`` (N,)
    int64 marks interchangeable pairs (e.g. identical captions): retrieving any pair of the query's
    group counts as a hit. Default: every pair is its own group (the standard protocol).
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"expected aligned (N, E) features, got {tuple(image_features.shape)} and "
                         f"{tuple(text_features.shape)}")
    groups = torch.arange(image_features.shape[0]) if groups is None else groups
    similarity = image_features @ text_features.T
    image_to_text = _recall(similarity, groups, groups, ks)
    text_to_image = _recall(similarity.T, groups, groups, ks)
    return {**{f"image_to_text_R@{k}": v for k, v in image_to_text.items()},
            **{f"text_to_image_R@{k}": v for k, v in text_to_image.items()}}


def caption_groups(captions: Sequence[str]) -> torch.Tensor:
    """Group id per caption: identical strings share a group (N,) int64."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(caption, len(ids)) for caption in captions], dtype=torch.int64)


def caption_retrieval(model: torch.nn.Module, image_features: torch.Tensor, captions: Sequence[str], *,
                      tokenizer: Callable, device: torch.device, precision: str = "fp32") -> dict:
    """Recall@1/5/10 both ways of N pairs: ``image_features`` (N, E) and their N captions, encoded here.

    What counts as a hit: :data:`MATCH_RULE` (pairs whose captions are the same string count as one).
    """
    text_features = encode_texts(model, captions, tokenizer, device, precision)
    return retrieval_recall(image_features, text_features, groups=caption_groups(captions))
