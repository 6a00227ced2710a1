"""The trainer: ``fastclip train`` / ``python -m fastclip.train`` (see ``fastclip.train.main``).

From Python: ``fastclip.train.train(fastclip.train.TrainConfig(model="RN-Tiny", ...))``.
"""
from fastclip.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name == "train":  # imported on use: the trainer pulls in the model, data and loss stacks
        from fastclip.train.main import train

        return train
    raise AttributeError(f"module 'fastclip.train' has no attribute {name!r}")
