"""Helpers shared by the chunked PyTorch primitives of both losses."""
from __future__ import annotations

import torch


def accumulate_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Softmax / sigmoid statistics are always accumulated in fp32 (fp64 for fp64 inputs, for gradcheck)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def gemm_dtype(tensor: torch.Tensor) -> torch.dtype:
    """GEMMs run in the input dtype on accelerators (tensor cores) and in fp32 on CPU (fast and exact)."""
    if tensor.device.type == "cpu":
        return accumulate_dtype(tensor)
    return tensor.dtype


def chunk_logits(image_chunk: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 accumulate: torch.dtype) -> torch.Tensor:
    """S = scale * image_chunk @ text.T + bias, as a fresh (chunk, n_cols) tensor of dtype ``accumulate``."""
    logits = torch.mm(image_chunk, text.t())
    if logits.dtype != accumulate:
        logits = logits.to(accumulate)
    return logits.mul_(scale).add_(bias)


def positive_entries(start: int, stop: int, n_cols: int, positive_offset: int, device) -> tuple:
    """(row index within the chunk, column index) of the positive pairs j = i + positive_offset."""
    rows = torch.arange(start, stop, device=device)
    cols = rows + positive_offset
    valid = (cols >= 0) & (cols < n_cols)
    return rows[valid] - start, cols[valid]


def add_scaled_product(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """out += left @ right, accumulating in out's dtype even when the GEMM runs in a lower precision."""
    if left.dtype == out.dtype:
        out.addmm_(left, right)
    else:
        out.add_(torch.mm(left, right).to(out.dtype))
