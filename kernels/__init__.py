"""Triton kernels of fastclip, shipped inside the wheel as ``fastclip.kernels``.

Importing this package never imports triton; each kernel module does, and the launchers in
``fastclip/ops/*_triton.py`` import those modules only when the triton backend runs.
"""
