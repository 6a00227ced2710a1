"""The trainer: ``fastclip train`` / ``python -m fastclip.train`` (see ``fastclip.train.main``)."""
