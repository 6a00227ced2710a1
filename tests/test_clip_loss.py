"""fastclip's ClipLoss against open_clip (fp32, 1e-5), an fp64 truth (fp16/bf16), gradcheck, memory, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss

from fastclip.loss import ClipLoss, clip_loss
from tests.loss_utils import clip_like_features, loss_and_grads
from tests.numerics import assert_close_to_truth, assert_matches_reference, rms

LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature, already exponentiated
SCALE_FIDELITY_SEEDS = 6


def _naive_per_pair(image, text, scale):
    """Plain PyTorch oracle of the per-pair loss 1/2 (CE_row_i + CE_col_i), materialising S."""
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none"))


@pytest.mark.parametrize("batch", [1, 37, 1000])
@pytest.mark.parametrize("dim", [3, 200, 768])
@pytest.mark.parametrize("output_dict", [False, True])
def test_values_and_gradients_match_open_clip(batch, dim, output_dict):
    image, text = clip_like_features(batch, dim, seed=batch * 1000 + dim)
    bias = -2.5
    ours = loss_and_grads(ClipLoss(), image, text, LOGIT_SCALE, bias, output_dict=output_dict)
    reference = loss_and_grads(OpenClipLoss(), image, text, LOGIT_SCALE, bias, output_dict=output_dict)
    assert_matches_reference(ours["loss"], reference["loss"], name="loss", floor=1.0)
    for name in ("image", "text", "logit_scale"):
        assert_matches_reference(ours[name], reference[name], name=f"grad {name}")
    assert_matches_reference(ours["logit_bias"], reference["logit_bias"], name="grad logit_bias", floor=1.0)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_large_and_small_temperatures_match_open_clip(scale):
    image, text = clip_like_features(300, 64, seed=int(scale))
    ours = loss_and_grads(ClipLoss(), image, text, scale)
    reference = loss_and_grads(OpenClipLoss(), image, text, scale)
    for name in ("loss", "image", "text", "logit_scale"):
        assert_matches_reference(ours[name], reference[name], name=name, floor=1.0 if name == "loss" else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,dim", [(37, 200), (300, 64)])
def test_low_precision_is_as_accurate_as_torch_in_that_dtype(dtype, batch, dim):
    image, text = clip_like_features(batch, dim, dtype, seed=batch + dim)
    ours = loss_and_grads(ClipLoss(), image, text, LOGIT_SCALE)
    baseline = loss_and_grads(OpenClipLoss(), image, text, LOGIT_SCALE)
    truth = loss_and_grads(OpenClipLoss(), image.double(), text.double(), LOGIT_SCALE)
    assert_close_to_truth(ours["loss"], baseline["loss"], truth["loss"], dtype=dtype, kind="fwd", name="loss")
    for name in ("image", "text", "logit_scale"):
        assert_close_to_truth(ours[name], baseline[name], truth[name], dtype=dtype, kind="bwd", name=f"grad {name}")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(normalize, reduction):
    generator = torch.Generator().manual_seed(7)
    image = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    text = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    function = lambda i, t, s, b: clip_loss(i, t, s, logit_bias=b, normalize=normalize, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(function, (image, text, scale, bias))


def test_normalize_inside_equals_normalizing_before():
    generator = torch.Generator().manual_seed(3)
    image, text = torch.randn(37, 200, generator=generator) * 3, torch.randn(37, 200, generator=generator) * 0.2
    ours = loss_and_grads(ClipLoss(normalize=True), image, text, LOGIT_SCALE)
    normalizing = lambda i, t, s: OpenClipLoss()(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s)  # noqa: E731
    reference = loss_and_grads(normalizing, image, text, LOGIT_SCALE)
    for name in ("loss", "image", "text", "logit_scale"):
        assert_matches_reference(ours[name], reference[name], name=name)


def test_reductions_match_the_per_pair_oracle():
    image, text = clip_like_features(37, 16, torch.float64, seed=11)
    weights = torch.rand(37, dtype=torch.float64)
    for reduction, reduce in (("none", lambda v: v), ("sum", torch.sum), ("mean", torch.mean)):
        ours = loss_and_grads(lambda i, t, s: (clip_loss(i, t, s, reduction=reduction) * (weights if reduction == "none" else 1)).sum(),
                              image, text, 3.0)
        oracle = loss_and_grads(lambda i, t, s: (reduce(_naive_per_pair(i, t, s)) * (weights if reduction == "none" else 1)).sum(),
                                image, text, 3.0)
        for name in ("loss", "image", "text", "logit_scale"):
            assert_matches_reference(ours[name], oracle[name], name=f"{reduction} {name}", rtol=1e-10)


def test_non_contiguous_inputs_and_float_scale():
    image, text = clip_like_features(37, 200, seed=5)
    strided_image = torch.stack([image, image], dim=2)[:, :, 0]  # non-contiguous view equal to image
    transposed_text = text.T.contiguous().T
    assert not strided_image.is_contiguous() and not transposed_text.is_contiguous()
    leaves = [strided_image.detach().requires_grad_(), transposed_text.detach().requires_grad_()]
    assert not leaves[0].is_contiguous() and not leaves[1].is_contiguous()
    ours = clip_loss(*leaves, LOGIT_SCALE)  # a Python float: no gradient for it
    ours.backward()
    reference = loss_and_grads(OpenClipLoss(), image, text, LOGIT_SCALE)
    assert_matches_reference(ours, reference["loss"], name="loss", floor=1.0)
    assert_matches_reference(leaves[0].grad, reference["image"], name="grad image (strided)")
    assert_matches_reference(leaves[1].grad, reference["text"], name="grad text (transposed)")


def test_small_workspace_chunks_are_as_accurate_as_one_chunk(monkeypatch):
    """Chunks of a few rows merge the column statistics ~40 times and sum grad_text in pieces: each
    result stays within the fp32 error bar of open_clip against the fp64 truth, as one chunk does."""
    image, text = clip_like_features(300, 48, seed=9)
    truth = loss_and_grads(OpenClipLoss(), image.double(), text.double(), LOGIT_SCALE)
    baseline = loss_and_grads(OpenClipLoss(), image, text, LOGIT_SCALE)
    whole = loss_and_grads(ClipLoss(), image, text, LOGIT_SCALE)
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "0.02")  # 5-8 rows per chunk
    chunked = loss_and_grads(ClipLoss(), image, text, LOGIT_SCALE)
    for ours in (whole, chunked):
        for name in ("loss", "image", "text", "logit_scale"):
            kind = "fwd" if name == "loss" else "bwd"
            assert_close_to_truth(ours[name], baseline[name], truth[name], dtype=torch.float32, kind=kind, name=name)


def test_column_far_below_the_chunk_max_keeps_its_precision():
    # The images cluster around one direction and text 0 points the other way: its column's logits sit
    # ~2*scale below the chunk max, where exp(S - chunk max) underflows in fp32 (a one-GEMV column sum
    # would give log 0); the torch backend's exact fallback must catch it.
    generator = torch.Generator().manual_seed(2)
    centre = F.normalize(torch.randn(8, generator=generator), dim=0)
    image = F.normalize(centre + 0.1 * torch.randn(64, 8, generator=generator), dim=-1)
    text = F.normalize(image + 0.1 * torch.randn(64, 8, generator=generator), dim=-1)
    text[0] = -centre
    logits = 60.0 * image @ text.T
    assert float((logits[:, 0] - logits.max()).exp().sum()) < 1e-30, "column 0 no longer underflows: test too easy"
    ours = loss_and_grads(ClipLoss(backend="torch"), image, text, 60.0)
    reference = loss_and_grads(OpenClipLoss(), image, text, 60.0)
    for name in ("loss", "image", "text", "logit_scale"):
        assert_matches_reference(ours[name], reference[name], name=name)


def test_deterministic_mode_is_bitwise_repeatable():
    image, text = clip_like_features(300, 64, seed=4)
    first = loss_and_grads(ClipLoss(deterministic=True), image, text, LOGIT_SCALE)
    second = loss_and_grads(ClipLoss(deterministic=True), image, text, LOGIT_SCALE)
    for name in ("loss", "image", "text", "logit_scale"):
        assert torch.equal(first[name], second[name]), name


def test_non_finite_features_give_a_non_finite_loss():
    image, text = clip_like_features(37, 16, seed=1)
    image[5, 3] = float("nan")
    assert not torch.isfinite(clip_loss(image, text, LOGIT_SCALE))
    image[5, 3] = float("inf")
    assert not torch.isfinite(clip_loss(image, text, LOGIT_SCALE))


def _saved_bytes(run) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return total


@pytest.mark.parametrize("normalize", [False, True])
def test_saves_only_inputs_and_vectors_for_backward(normalize, monkeypatch):
    batch, dim = 1000, 16
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "1")  # chunks of ~125 rows: a saved chunk x B tensor would show
    image, text = clip_like_features(batch, dim, seed=6)
    image.requires_grad_()
    text.requires_grad_()
    scale = torch.tensor(LOGIT_SCALE, requires_grad=True)
    saved = _saved_bytes(lambda: clip_loss(image, text, scale, normalize=normalize))
    inputs = 2 * batch * dim * 4
    vectors = 8 * batch * 4  # a handful of fp32 (B,) vectors: LSEs, norms
    assert saved <= inputs + vectors + 64, f"saved {saved} bytes > inputs {inputs} + O(B) {vectors}"
    open_clip_saved = _saved_bytes(lambda: OpenClipLoss()(image, text, scale))
    assert open_clip_saved >= batch * batch * 4  # the check can see a B x B tensor when one is saved


@pytest.mark.parametrize("call,error,match", [
    (lambda i, t: clip_loss(i, t[:-1], 2.0), ValueError, "same shape"),
    (lambda i, t: clip_loss(i[None], t[None], 2.0), ValueError, "2-D"),
    (lambda i, t: clip_loss(i, t.double(), 2.0), TypeError, "one dtype"),
    (lambda i, t: clip_loss(i.long(), t.long(), 2.0), TypeError, "float32"),
    (lambda i, t: clip_loss(i, t.to("meta"), 2.0), ValueError, "one device"),
    (lambda i, t: clip_loss(i[:0], t[:0], 2.0), ValueError, "empty batch"),
    (lambda i, t: clip_loss(i[:, :0], t[:, :0], 2.0), ValueError, "at least 1"),
    (lambda i, t: clip_loss(i.tolist(), t, 2.0), TypeError, "torch.Tensor"),
    (lambda i, t: clip_loss(i, t, float("nan")), ValueError, "finite"),
    (lambda i, t: clip_loss(i, t, torch.tensor(float("inf"))), ValueError, "finite"),  # a CPU tensor: no sync
    (lambda i, t: clip_loss(i, t, 0.0), ValueError, "> 0"),
    (lambda i, t: clip_loss(i, t, -math.log(100)), ValueError, "exponentiated"),
    (lambda i, t: clip_loss(i, t, torch.ones(2)), ValueError, "one value"),
    (lambda i, t: clip_loss(i, t, "14"), TypeError, "float"),
    (lambda i, t: clip_loss(i, t, 2.0, reduction="max"), ValueError, "reduction"),
    (lambda i, t: clip_loss(i, t, 2.0, backend="cudnn"), ValueError, "unknown"),
    (lambda i, t: clip_loss(i, t, 2.0, backend="cuda"), ValueError, "cannot run"),
    (lambda i, t: clip_loss(i, t, 2.0, dist_impl="allreduce"), ValueError, "dist_impl"),
    (lambda i, t: ClipLoss(world_size=2, rank=0)(i, t, 2.0), ValueError, "init_process_group"),
    (lambda i, t: ClipLoss(use_horovod=True), ValueError, "torch.distributed"),
])
def test_bad_input_raises_an_error_that_names_the_fix(call, error, match):
    image, text = clip_like_features(8, 4, seed=0)
    with pytest.raises(error, match=match):
        call(image, text)


def test_forced_backend_error_lists_every_reason():
    image, text = clip_like_features(8, 4, seed=0)
    with pytest.raises(ValueError) as info:
        clip_loss(image, text, 2.0, backend="cuda")
    message = str(info.value)
    assert "runs on cuda tensors, got cpu" in message
    from fastclip.ops import cuda_common

    assert ("not built" in message) == bool(cuda_common.install_reasons()), "the build reason, only when unbuilt"


def test_model_output_dict_plugs_in():
    image, text = clip_like_features(37, 32, seed=8)
    outputs = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(LOGIT_SCALE)}
    result = ClipLoss()(**outputs, output_dict=True)
    assert set(result) == {"contrastive_loss"}
    assert_matches_reference(result["contrastive_loss"], OpenClipLoss()(**outputs), name="loss", floor=1.0)


def test_tiny_convergence_matches_open_clip_curve():
    """A few hundred steps of linear image/text projections: the same loss curve as open_clip's."""
    generator = torch.Generator().manual_seed(0)
    raw_images, raw_texts = torch.randn(512, 24, generator=generator), torch.randn(512, 20, generator=generator)
    raw_texts[:, :12] += raw_images[:, :12]  # a shared signal to learn

    def train(loss_module):
        torch.manual_seed(0)
        image_proj, text_proj = torch.nn.Linear(24, 16), torch.nn.Linear(20, 16)
        log_scale = torch.nn.Parameter(torch.tensor(math.log(LOGIT_SCALE)))
        optimizer = torch.optim.SGD([*image_proj.parameters(), *text_proj.parameters(), log_scale], lr=0.5)
        losses = []
        for step in range(300):
            rows = torch.arange(step * 64, step * 64 + 64) % 512
            image = F.normalize(image_proj(raw_images[rows]), dim=-1)
            text = F.normalize(text_proj(raw_texts[rows]), dim=-1)
            loss = loss_module(image, text, log_scale.exp())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    ours, reference = train(ClipLoss()), train(OpenClipLoss())
    assert reference[-20:].mean() < 0.5 * reference[:20].mean()  # it learns something
    assert_matches_reference(ours, reference, name="loss curve", rtol=1e-4, floor=1.0)


def _logit_scale_samples(monkeypatch, backend, seeds, batch, correlated=0.5):
    """(ours, open_clip fp32, fp64 truth) d loss / d logit_scale at scale 100, D = 64, per seed."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("FASTCLIP_FP32_PRECISION", "ieee")  # TF32 dots would be a different comparison
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    samples = []
    for seed in seeds:
        image, text = clip_like_features(batch, 64, seed=seed, correlated=correlated)
        truth = float(loss_and_grads(OpenClipLoss(), image.double(), text.double(), 100.0)["logit_scale"])
        reference = float(loss_and_grads(OpenClipLoss(), image, text, 100.0)["logit_scale"])
        ours = float(loss_and_grads(ClipLoss(backend=backend), image.to(device), text.to(device), 100.0)["logit_scale"])
        samples.append((ours, reference, truth))
    return samples


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("batch", [37, 64, 256, 1000])
def test_logit_scale_gradient_is_as_accurate_as_open_clips(monkeypatch, backend, batch):
    """fp32, scale 100, pairs aligned enough that each softmax sits mostly on its positive (the
    case where d loss / d scale is a small difference): the relative error against the fp64 truth
    is within 2x open_clip's own. Either error swings ~10x from seed to seed, so each is measured as
    the RMS over SCALE_FIDELITY_SEEDS inputs. Before the backward summed the scale gradient in
    log-softmax form it was ~10x open_clip's here (sum_i I_i . dI_i / scale, or sum G x)."""
    samples = _logit_scale_samples(monkeypatch, backend, range(SCALE_FIDELITY_SEEDS), batch)
    ours_errors = [abs(ours - truth) / abs(truth) for ours, _, truth in samples]
    open_clip_errors = [abs(reference - truth) / abs(truth) for _, reference, truth in samples]
    assert rms(ours_errors) <= 2 * rms(open_clip_errors), (
        f"B={batch} {backend}: relative errors {ours_errors} vs open_clip's {open_clip_errors}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logit_scale_gradient_near_a_zero_loss_is_as_accurate_as_open_clips(monkeypatch, backend):
    """Scale 100, B = 32, D = 64, text = image + 1.2 noise (loss ~1e-5 on most draws, ~1e-2 on a few
    with one soft column): the RMS of (ours - fp64 truth) over 24 draws within 2x open_clip's. The
    errors are absolute: open_clip's relative error is ~100 % here, so a relative bar would hold
    nothing. The draws with a soft column dominate, where the gradient reads the logits' own
    rounding: scaling the image rows before the GEMM (one more rounding per term) gave 2.0x here
    for torch, scaling its output 1.2x (fastclip/ops/chunking.py: scaled_logits_into)."""
    # the seeds of benchmarks/numerics_scale_error.py --data nearzero --worlds 1
    samples = _logit_scale_samples(monkeypatch, backend, range(100, 124), 32, correlated=1 / 1.2)
    ours_errors = [ours - truth for ours, _, truth in samples]
    open_clip_errors = [reference - truth for _, reference, truth in samples]
    assert rms(ours_errors) <= 2 * rms(open_clip_errors), (
        f"{backend}: errors {ours_errors} vs open_clip's {open_clip_errors}")


@pytest.mark.parametrize("batch,dim", [(37, 200), (1000, 64)])
def test_error_bar_catches_a_tenth_of_a_percent_in_the_temperature_gradient(batch, dim):
    """The fp32 bar of tests/numerics.py is scaled to the quantity: d loss / d logit_scale is ~1e-2..1e-4,
    and a 0.1 % error in it must fail (an absolute floor of 1e-6 once let 1.6 % pass)."""
    image, text = clip_like_features(batch, dim, seed=batch + dim)
    ours = loss_and_grads(ClipLoss(), image, text, LOGIT_SCALE)
    baseline = loss_and_grads(OpenClipLoss(), image, text, LOGIT_SCALE)
    truth = loss_and_grads(OpenClipLoss(), image.double(), text.double(), LOGIT_SCALE)
    judge = lambda value: assert_close_to_truth(value, baseline["logit_scale"], truth["logit_scale"],  # noqa: E731
                                                dtype=torch.float32, kind="bwd", name="grad logit_scale")
    judge(ours["logit_scale"])
    with pytest.raises(AssertionError, match="grad logit_scale"):
        judge(ours["logit_scale"] * 1.001)
