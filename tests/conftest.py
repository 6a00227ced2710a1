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


@pytest.fixture
def seed(request) -> int:
    """A seed for the test's randomness: FASTCLIP_TEST_SEED if set, else one fixed per test (from its id).

    torch, numpy and ``random`` are seeded with it, and a failing test's report names it, so
    ``FASTCLIP_TEST_SEED=<seed> pytest <test id>`` reproduces the failure.
    """
    import random
    import zlib

    import numpy as np

    chosen = int(os.environ.get("FASTCLIP_TEST_SEED", zlib.crc32(request.node.nodeid.encode()) % 2**31))
    random.seed(chosen)
    np.random.seed(chosen)
    torch.manual_seed(chosen)
    request.node.fastclip_seed = chosen
    return chosen


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    chosen = getattr(item, "fastclip_seed", None)
    if chosen is not None and report.failed:
        report.sections.append(("seed", f"reproduce with FASTCLIP_TEST_SEED={chosen} pytest '{item.nodeid}'"))
