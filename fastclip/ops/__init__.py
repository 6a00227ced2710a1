"""Launchers and autograd Functions of fastclip's ops.

Layout follows one op, one name in every layer:
``clip_loss.py`` / ``siglip_loss.py`` hold the autograd Functions (backend-agnostic, distributed-aware);
``<op>_torch.py`` the portable chunked PyTorch primitives (also the test oracle's building blocks);
``<op>_triton.py`` the launchers of the Triton kernels in ``kernels/<op>.py``.
"""
