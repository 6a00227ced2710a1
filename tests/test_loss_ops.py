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
    arguments = (image, text, scale, bias, with_expectations, 5, False)
    torch.library.opcheck(clip_loss_torch.clip_loss_fwd, arguments)
    row_lse, col_lse, row_expect, col_expect, positive = clip_loss_torch.clip_loss_fwd(*arguments)
    logits = (scale * image.double() @ text.double().T + bias)
    rows = torch.arange(37)
    in_columns = rows + 5 < 53  # S_i,i+5 where that column exists, else 0
    torch.testing.assert_close(positive[in_columns].double(), logits[rows[in_columns], rows[in_columns] + 5],
                               rtol=1e-6, atol=1e-5)
    assert (positive[~in_columns] == 0).all()
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
    whole = clip_loss_torch.clip_loss_fwd(image, text, scale, bias, True, 0, False)
    lse, expect = None, None
    for block in text.split(64):
        block_lse, _, block_expect, _, _ = clip_loss_torch.clip_loss_fwd(image, block, scale, bias, True, 0, False)
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


def test_siglip_loss_torch_ops_opcheck_and_values():
    image, text, scale, bias = _block(37, 53, 20, seed=3)
    torch.library.opcheck(siglip_loss_torch.siglip_loss_fwd, (image, text, scale, bias, 3, False))
    torch.library.opcheck(siglip_loss_torch.siglip_loss_bwd, (image, text, scale, bias, 3, torch.tensor(0.5), False))
    loss_sum = siglip_loss_torch.siglip_loss_fwd(image, text, scale, bias, 3, False)
    grad_image, grad_text, grad_bias = siglip_loss_torch.siglip_loss_bwd(image, text, scale, bias, 3, torch.tensor(0.5),
                                                                         False)
    logits = scale * image.double() @ text.double().T + bias  # the fp64 dense truth, positives at j = i + 3
    positives = torch.zeros_like(logits)
    positives[torch.arange(37), torch.arange(37) + 3] = 1
    assert_matches_reference(loss_sum, -torch.nn.functional.logsigmoid((2 * positives - 1) * logits).sum(),
                             name="loss_sum", floor=1.0)
    grad_logits = 0.5 * (logits.sigmoid() - positives)
    assert_matches_reference(grad_image, 9.0 * grad_logits @ text.double(), name="grad_image")
    assert_matches_reference(grad_text, 9.0 * grad_logits.T @ image.double(), name="grad_text")
    assert_matches_reference(grad_bias, grad_logits.sum(), name="grad_bias", floor=1.0)


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


# ------------------------------------------------------------- the accelerator branch, run on CPU
# On an accelerator the torch backend runs its GEMMs in the 16-bit input dtype (scaled_logits_into
# multiplies by the temperature after the GEMM, in fp32). CPU normally takes the fp32 path, so these tests force the accelerator branch
# and judge it against an fp64 truth, with a dense same-dtype baseline as the error bar.


@pytest.fixture
def accelerator_branch(monkeypatch):
    """Force the 16-bit GEMM branch on CPU; yields what the GEMMs saw.

    CPU has no mm/bmm with an fp32 out_dtype, so it is emulated the way cuBLAS computes it: fp32
    products and sums of the 16-bit inputs.
    """
    from fastclip.ops import chunking

    seen = []
    real_scaled_logits_into = chunking.scaled_logits_into

    def scaled_logits_into(out, image_chunk, text, scale):
        seen.append(image_chunk.dtype)
        return real_scaled_logits_into(out, image_chunk, text, scale)

    def with_out_dtype(real, name):
        def gemm(left, right, *, out_dtype=None, **kwargs):
            if out_dtype is None:
                return real(left, right, **kwargs)
            seen.append((name, left.dtype, out_dtype))
            return real(left.to(out_dtype), right.to(out_dtype))
        return gemm

    for module in (clip_loss_torch, siglip_loss_torch):
        monkeypatch.setattr(module, "gemm_dtype", lambda tensor: tensor.dtype)
        monkeypatch.setattr(module, "scaled_logits_into", scaled_logits_into)
    monkeypatch.setattr(torch, "mm", with_out_dtype(torch.mm, "mm"))
    return seen


def _dense_clip_loss(image, text, scale, bias):
    """Plain dense PyTorch CLIP loss (materialises S) with the softmax in fp32 or fp64."""
    accumulate = torch.float64 if image.dtype == torch.float64 else torch.float32
    logits = (scale * image @ text.T).to(accumulate) + bias
    labels = torch.arange(image.shape[0])
    return 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))


def _dense_siglip_loss(image, text, scale, bias):
    accumulate = torch.float64 if image.dtype == torch.float64 else torch.float32
    logits = (scale * image @ text.T).to(accumulate) + bias
    signs = 2 * torch.eye(image.shape[0], dtype=accumulate) - 1
    return -torch.nn.functional.logsigmoid(signs * logits).sum() / image.shape[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_accelerator_16bit_branch_is_as_accurate_as_dense_torch(accelerator_branch, dtype, loss_name):
    from fastclip.loss import ClipLoss, SigLipLoss
    from tests.loss_utils import loss_and_grads
    from tests.numerics import assert_close_to_truth

    seed = 37 + (dtype == torch.float16) + 2 * (loss_name == "siglip")
    image, text = clip_like_features(37, 200, dtype, seed=seed)
    scale, bias = 14.0, -2.5  # exact in every dtype: the truth sees the very inputs ours sees
    ours_loss = ClipLoss(backend="torch") if loss_name == "clip" else SigLipLoss(backend="torch")
    dense = _dense_clip_loss if loss_name == "clip" else _dense_siglip_loss
    ours = loss_and_grads(ours_loss, image, text, scale, bias)
    assert dtype in accelerator_branch and ("mm", dtype, torch.float32) in accelerator_branch, \
        f"the 16-bit GEMM branch was not taken (seed {seed})"
    baseline = loss_and_grads(dense, image, text, scale, bias)
    truth = loss_and_grads(dense, image.double(), text.double(), scale, bias)
    for name in ("loss", "image", "text", "logit_scale", "logit_bias"):
        kind = "fwd" if name == "loss" else "bwd"
        assert_close_to_truth(ours[name], baseline[name], truth[name], dtype=dtype, kind=kind,
                              name=f"{loss_name} {name} (seed {seed})")
