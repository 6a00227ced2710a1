"""Test-wide setup.

Without a GPU, the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before any kernel module is imported, so it is set here, at collection, unless the caller chose.
GPU-only tests carry ``@pytest.mark.gpu`` and are skipped when CUDA is absent.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # a marker, not a keyword: a folder named gpu matches those
            item.add_marker(skip_gpu)
