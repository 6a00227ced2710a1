"""The torch backend's primitives are registered custom ops: opcheck them (schema, fake kernel, autograd)."""
from __future__ import annotations

import pytest
import torch

from fastclip.ops import clip_loss_torch, siglip_loss_torch
from fastclip.ops.chunking import merge_lse
from tests.loss_utils import clip_like_features
from tests.numerics import assert_matches_reference


def _block(rows: int, cols: int, dim: int, seed: int):
    image, _ = clip_like_features(rows, dim, seed=seed)
    _, text = clip_like_features(cols, dim, seed=seed + 1)
    return image, text, torch.tensor(9.0), torch.tensor(-1.5)


@pytest.mark.parametrize("with_expectations", [False, True])
def test_clip_loss_fwd_torch_opcheck_and_values(with_expectations):
    image, text, scale, bias = _block(37, 53, 20, seed=1)
    arguments = (image, text, scale, bias, with_expectations, False)
    torch.library.opcheck(clip_loss_torch.clip_loss_fwd, arguments)
    row_lse, col_lse, row_expect, col_expect = clip_loss_torch.clip_loss_fwd(*arguments)
    logits = (scale * image.double() @ text.double().T + bias)
    torch.testing.assert_close(row_lse.double(), logits.logsumexp(1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(col_lse.double(), logits.logsumexp(0), rtol=1e-6, atol=1e-5)
    if with_expectations:
        # the expected log-probabilities (minus the row / column entropies)
        expected_row = (logits.softmax(1) * logits.log_softmax(1)).sum(1)
        expected_col = (logits.softmax(0) * logits.log_softmax(0)).sum(0)
        torch.testing.assert_close(row_expect.double(), expected_row, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(col_expect.double(), expected_col, rtol=1e-5, atol=1e-6)


def test_merged_block_statistics_are_as_accurate_as_one_call():
    """A ring visits the columns block by block and merges (lse, E[log p]) with merge_lse: over 8
    blocks at scale 100 the merged row statistics stay within 2x the one-call error against fp64
    (weights normalised by their sum, terms of one sign; merging E[x] lost ~|x| eps per merge)."""
    seed = 11
    image, text = clip_like_features(64, 64, seed=seed)
    text = torch.cat([text] + [clip_like_features(64, 64, seed=seed + k)[1] for k in range(1, 8)])
    scale, bias = torch.tensor(100.0), torch.tensor(0.0)
    logits = 100.0 * image.double() @ text.double().T
    truth = (logits.logsumexp(1), (logits.softmax(1) * logits.log_softmax(1)).sum(1))
    whole = clip_loss_torch.clip_loss_fwd(image, text, scale, bias, True, False)
    lse, expect = None, None
    for block in text.split(64):
        block_lse, _, block_expect, _ = clip_loss_torch.clip_loss_fwd(image, block, scale, bias, True, False)
        lse, expect = (block_lse, block_expect) if lse is None else merge_lse(lse, expect, block_lse, block_expect)
    for name, merged, one_call, exact in zip(("row_lse", "row_expect"), (lse, expect), (whole[0], whole[2]), truth):
        merged_error = (merged.double() - exact).abs().max().item()
        one_call_error = (one_call.double() - exact).abs().max().item()
        assert merged_error <= 2 * one_call_error + 1e-7, (
            f"seed {seed}: merged {name} error {merged_error:.2e} vs one call {one_call_error:.2e}")


@pytest.mark.parametrize("positive_offset", [0, 16, -5, 500])
def test_clip_loss_bwd_torch_opcheck_and_values(positive_offset):
    image, text, scale, bias = _block(37, 53, 20, seed=2)
    logits = (scale * image.double() @ text.double().T + bias)
    row_lse, col_lse = logits.logsumexp(1).float(), logits.logsumexp(0).float()
    generator = torch.Generator().manual_seed(100 + positive_offset)
    row_coef, col_coef = torch.rand(37, generator=generator), torch.rand(53, generator=generator)
    arguments = (image, text, scale, bias, row_lse, col_lse, row_coef, col_coef, positive_offset, False)
    torch.library.opcheck(clip_loss_torch.clip_loss_bwd, arguments)
    grad_image, grad_text, grad_scale = clip_loss_torch.clip_loss_bwd(*arguments)
    positives = torch.zeros_like(logits)
    rows = torch.arange(37)
    valid = (rows + positive_offset >= 0) & (rows + positive_offset < 53)
    positives[rows[valid], rows[valid] + positive_offset] = 1
    log_p, log_q = logits - row_lse.double()[:, None], logits - col_lse.double()[None, :]
    row_part = row_coef.double()[:, None] * (log_p.exp() - positives)
    col_part = col_coef.double()[None, :] * (log_q.exp() - positives)
    grad_logits = row_part + col_part
    assert_matches_reference(grad_image, 9.0 * grad_logits @ text.double(), name="grad_image")
    assert_matches_reference(grad_text, 9.0 * grad_logits.T @ image.double(), name="grad_text")
    # This block's share of d scale (backends.py): it differs from sum G x here, since the block's rows
    # and columns do not each hold one positive; test_grad_scale_shares_add_up_to_sum_g_x adds shares.
    assert_matches_reference(grad_scale, (row_part * log_p + col_part * log_q).sum() / 9.0, name="grad_scale",
                             floor=1e-3)


def test_grad_scale_shares_add_up_to_sum_g_x():
    """Split a square problem as the distributed layer does (row blocks x column blocks, offsets):
    the blocks' grad_scale shares add up to sum_ij G_ij x_ij of the whole, which is d loss / d scale."""
    image, text, scale, bias = _block(60, 60, 20, seed=3)
    text = 0.7 * text + 0.7 * image  # aligned pairs: the softmaxes sit mostly on their positives
    logits = scale * image.double() @ text.double().T + bias
    row_lse, col_lse = logits.logsumexp(1).float(), logits.logsumexp(0).float()
    coef = torch.full((60,), 0.5 / 60)
    total = 0.0
    for rows in (slice(0, 20), slice(20, 60)):
        for cols in (slice(0, 35), slice(35, 60)):
            total += clip_loss_torch.clip_loss_bwd(image[rows], text[cols], scale, bias, row_lse[rows], col_lse[cols],
                                                   coef[rows], coef[cols], rows.start - cols.start, False)[2]
    grad_logits = (0.5 / 60) * (logits.softmax(1) + logits.softmax(0) - 2 * torch.eye(60, dtype=torch.float64))
    assert_matches_reference(total, (grad_logits * (image.double() @ text.double().T)).sum(), name="sum of shares")


def test_siglip_loss_torch_ops_opcheck():
    image, text, scale, bias = _block(37, 53, 20, seed=3)
    torch.library.opcheck(siglip_loss_torch.siglip_loss_fwd, (image, text, scale, bias, 3, False))
    torch.library.opcheck(siglip_loss_torch.siglip_loss_bwd, (image, text, scale, bias, 3, torch.tensor(0.5), False))


def test_compiled_model_and_torch_backend_loss_have_no_graph_break():
    from fastclip.loss import ClipLoss

    torch.manual_seed(5)
    model = torch.nn.Linear(16, 32)
    loss_fn = ClipLoss(backend="torch")
    step = lambda i, t, s: loss_fn(model(i), model(t), s)  # noqa: E731
    image, text = torch.randn(37, 16), torch.randn(37, 16)
    scale = torch.tensor(14.0, requires_grad=True)
    eager = step(image, text, scale)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(image, text, scale)
    compiled.backward()
    assert_matches_reference(compiled, eager, name="compiled loss", floor=1.0)
    assert scale.grad is not None and torch.isfinite(scale.grad)
