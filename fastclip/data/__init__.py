"""Datasets of image-caption pairs: the embedded procedural shapes set, CSV, webdataset, synthetic.

``shapes``: the generator of the embedded set (PNG + CSV, cached). ``csv_dataset``/``webdataset_dataset``/
``synthetic``: datasets yielding ``(image, tokens, skipped)``. ``loader``: per-rank, resumable batches.
"""
