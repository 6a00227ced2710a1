"""Evaluation: zero-shot classification with prompt ensembling, retrieval recall@k, linear probe.

``fastclip eval --task zeroshot|retrieval|linear-probe`` (``fastclip.eval.main``).
"""
