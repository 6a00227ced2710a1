"""fastclip.model: configs, outputs, init, attention backends, checkpointing, patch dropout, compile."""
import json
import math
from pathlib import Path

import pytest
import torch

import fastclip
from fastclip.loss import ClipLoss
from fastclip.model import CONFIGS, CLIP, create_model
from fastclip.model.transformer import QuickGELU, Transformer
from fastclip.model.vision import PatchDropout

CAPTIONS = ["a red circle", "a small blue square on a white background", "x", "two green triangles, 3 dots"]
RUNNABLE_IMPLS = [name for name, available, _ in fastclip.model.describe_backends() if available]


def _inputs(config, batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    return images, fastclip.tokenize(CAPTIONS[:batch])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("fastclip-tiny")


# ------------------------------------------------------------------------------------ configs


def _open_clip_config_dir():
    open_clip = pytest.importorskip("open_clip")
    return Path(open_clip.__file__).parent / "model_configs"


@pytest.mark.parametrize("name", sorted(n for n in CONFIGS if not n.startswith(("fastclip-", "ViT-Tiny", "RN-Tiny"))))
def test_config_equals_open_clip(name):
    path = _open_clip_config_dir() / f"{name}.json"
    if not path.exists():  # open_clip ships -quickgelu files for some names only
        path = _open_clip_config_dir() / f"{name.replace('-quickgelu', '')}.json"
    theirs = json.loads(path.read_text())
    ours = CONFIGS[name].to_open_clip()
    assert ours["embed_dim"] == theirs["embed_dim"]
    assert ours["quick_gelu"] == name.endswith("-quickgelu")
    for key, value in theirs["vision_cfg"].items():
        assert ours["vision_cfg"][key] == value, (name, key)
    for key, value in theirs["text_cfg"].items():
        assert ours["text_cfg"][key] == value, (name, key)
    assert ours["vision_cfg"]["head_width"] == theirs["vision_cfg"].get("head_width", 64)


def test_required_names_registered():
    base = ["RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]
    for name in base + [f"{n}-quickgelu" for n in base] + ["fastclip-tiny", "RN-Tiny", "ViT-Tiny-16"]:
        assert name in fastclip.model.list_models()
    with pytest.raises(ValueError, match="unknown model name 'ViT-X'.*RN50"):
        create_model("ViT-X")


def test_config_dict_round_trip():
    for config in CONFIGS.values():
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_bad_config_values():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("fastclip-tiny", image_size=60)
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("RN-Tiny", image_size=80)
    with pytest.raises(ValueError, match="patch_dropout needs a ViT"):
        create_model("RN-Tiny", patch_dropout=0.5)
    with pytest.raises(ValueError, match=r"patch_dropout must be in \[0, 1\)"):
        create_model("fastclip-tiny", patch_dropout=1.0)


# ------------------------------------------------------------------------------------ outputs


def test_forward_returns_the_loss_contract(tiny):
    images, text = _inputs(tiny.config)
    out = tiny(images, text)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == out["text_features"].shape == (4, 128)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))
    torch.testing.assert_close(tiny.encode_image(images, normalize=True), out["image_features"])
    torch.testing.assert_close(tiny.encode_text(text, normalize=True), out["text_features"])


def test_forward_feeds_clip_loss(tiny):
    """model(...) unpacks into ClipLoss; loss and d loss / d logit_scale equal open_clip's loss on the same outputs."""
    from open_clip.loss import ClipLoss as OpenClipLoss

    images, text = _inputs(tiny.config)
    out = tiny(images, text)
    loss = ClipLoss()(**out, output_dict=True)["contrastive_loss"]
    reference = OpenClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    (grad,) = torch.autograd.grad(loss, tiny.logit_scale, retain_graph=True)
    (reference_grad,) = torch.autograd.grad(reference, tiny.logit_scale)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-7)
    assert 0.1 < float(loss) < 10 and float(grad) != 0.0


def test_siglip_config_returns_logit_bias():
    torch.manual_seed(0)
    model = create_model("fastclip-tiny-siglip")
    out = model(*_inputs(model.config, batch=2))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(10.0))
    torch.testing.assert_close(out["logit_bias"], torch.tensor(-10.0))


def test_one_tower_only(tiny):
    images, text = _inputs(tiny.config)
    with torch.no_grad():
        both, image_only, text_only = tiny(images, text), tiny(image=images), tiny(text=text)
    assert image_only["text_features"] is None and text_only["image_features"] is None
    torch.testing.assert_close(image_only["image_features"], both["image_features"], rtol=0, atol=0)
    torch.testing.assert_close(text_only["text_features"], both["text_features"], rtol=0, atol=0)
    torch.testing.assert_close(image_only["logit_scale"], tiny.logit_scale.exp().detach(), rtol=0, atol=0)


def test_text_padding_can_be_cut(tiny):
    """Causal attention + EOT pooling: tokens cut after the longest EOT give the same features."""
    _, text = _inputs(tiny.config)
    length = int(text.argmax(dim=-1).max()) + 1
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_text(text[:, :length]), tiny.encode_text(text), atol=1e-5, rtol=1e-5)


def test_input_errors(tiny):
    with pytest.raises(ValueError, match="expected images of 64x64"):
        tiny.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="exceed the model's context_length 77"):
        tiny.encode_text(torch.zeros(1, 78, dtype=torch.long))


def test_size_overrides():
    torch.manual_seed(0)
    model = create_model("fastclip-tiny", image_size=96, context_length=32)
    assert model.visual.positional_embedding.shape == (12 * 12 + 1, 192)
    assert model.positional_embedding.shape == (32, 128)
    images, text = torch.randn(2, 3, 96, 96), fastclip.tokenize(CAPTIONS[:2], context_length=32)
    with torch.no_grad():
        out = model(images, text)
        encoded = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    assert out["image_features"].shape == (2, 128) and out["text_features"].shape == (2, 128)
    torch.testing.assert_close(out["image_features"], encoded, rtol=0, atol=0)
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(2), rtol=0, atol=1e-6)
    assert not torch.allclose(out["image_features"][0], out["image_features"][1], atol=1e-3)  # inputs matter


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_is_within_two_units_of_rounding_of_fp64(dtype):
    """Unit-norm features of a 16-bit model against the fp64 model with the same weights and the same
    (rounded) images: measured 0.27-0.42 eps(dtype) max abs, bounded at 2 eps."""
    torch.manual_seed(0)
    model = create_model("fastclip-tiny", dtype=dtype).eval()
    truth_model = create_model("fastclip-tiny").double().eval()
    truth_model.load_state_dict(model.state_dict())
    images, text = _inputs(model.config, batch=2)
    images = images.to(dtype)
    with torch.no_grad():
        out, truth = model(images, text), truth_model(images.double(), text)
    assert out["image_features"].dtype == dtype
    for key in ("image_features", "text_features"):
        error = float((out[key].double() - truth[key]).abs().max())
        assert error <= 2 * torch.finfo(dtype).eps, f"{key}: max abs error {error:.2e} vs fp64"


# ------------------------------------------------------------------------------------ init


def test_initialization_follows_openai():
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-16")
    width, layers = 256, 6
    stds = {"in_proj": width ** -0.5, "out_proj": width ** -0.5 * (2 * layers) ** -0.5,
            "c_fc": (2 * width) ** -0.5, "c_proj": width ** -0.5 * (2 * layers) ** -0.5}
    block = model.transformer.resblocks[0]
    measured = {"in_proj": block.attn.in_proj_weight, "out_proj": block.attn.out_proj.weight,
                "c_fc": block.mlp.c_fc.weight, "c_proj": block.mlp.c_proj.weight}
    for key, tensor in measured.items():
        assert abs(tensor.std().item() / stds[key] - 1) < 0.05, key
    assert abs(model.token_embedding.weight.std().item() / 0.02 - 1) < 0.02
    assert abs(model.positional_embedding.std().item() / 0.01 - 1) < 0.1
    assert abs(model.text_projection.std().item() / width ** -0.5 - 1) < 0.05
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert abs(model.visual.class_embedding.std().item() / 192 ** -0.5 - 1) < 0.25

    resnet = create_model("RN-Tiny")
    assert all(not b.bn3.weight.any() for stage in (resnet.visual.layer1, resnet.visual.layer4) for b in stage)
    pool = resnet.visual.attnpool
    assert abs(pool.q_proj.weight.std().item() / pool.c_proj.in_features ** -0.5 - 1) < 0.05


# ------------------------------------------------------------------------------------ attention impls


@pytest.mark.parametrize("name", ["fastclip-tiny", "RN-Tiny"])
@pytest.mark.parametrize("impl", [i for i in RUNNABLE_IMPLS if i != "math"])
def test_model_impls_agree_with_math(name, impl):
    torch.manual_seed(0)
    model = create_model(name, attn_impl="math").eval()
    images, text = _inputs(model.config)
    with torch.no_grad():
        expected = model.encode_image(images), model.encode_text(text)
        model.set_attn_impl(impl)
        assert {m.attn_impl for m in model.modules() if hasattr(m, "attn_impl")} == {impl}
        torch.testing.assert_close(model.encode_image(images), expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(text), expected[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_pooled_last_block_equals_full_stack(causal):
    torch.manual_seed(0)
    stack = Transformer(64, 3, 4, 256, quick_gelu=True)
    x = torch.randn(3, 11, 64)
    index = torch.tensor([10, 0, 4])
    full = stack(x, causal=causal)[torch.arange(3), index]
    torch.testing.assert_close(stack(x, causal=causal, pool_index=index), full, atol=2e-6, rtol=1e-5)


def test_quick_gelu_saves_input_only_and_matches_autograd():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(QuickGELU(), (x,))
    reference = x * torch.sigmoid(1.702 * x)
    torch.testing.assert_close(QuickGELU()(x), reference)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        QuickGELU()(x.float())
    assert len(saved) == 1


# ------------------------------------------------------------------------------------ checkpointing


def _loss_and_grads(model, images, text):
    out = model(images, text)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(len(logits))
    loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    return loss.detach(), dict(zip([n for n, _ in model.named_parameters()], grads))


@pytest.mark.parametrize("name", ["fastclip-tiny", "RN-Tiny", "fastclip-tiny-quickgelu"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    plain = create_model(name)
    checkpointed = create_model(name, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images, text = _inputs(plain.config)
    loss, grads = _loss_and_grads(plain, images, text)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, images, text)
    torch.testing.assert_close(loss_ckpt, loss)
    for key, grad in grads.items():
        if grad is None:
            assert grads_ckpt[key] is None, key
        else:
            torch.testing.assert_close(grads_ckpt[key], grad, atol=1e-6, rtol=1e-5, msg=key)
    # BatchNorm statistics advance once per step, not twice (the recompute restores them)
    for (key, buffer), other in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(other, buffer, msg=key)


def test_grad_checkpointing_saves_fewer_activations():
    def saved_bytes(model):
        images, text = _inputs(model.config)
        params = {p.data_ptr() for p in model.parameters()}
        storages = {}

        def pack(tensor):
            if tensor.data_ptr() not in params:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(images, text)
        (out["image_features"].sum() + out["text_features"].sum()).backward()
        return sum(storages.values())

    torch.manual_seed(0)
    assert saved_bytes(create_model("fastclip-tiny", grad_checkpointing=True)) < 0.5 * saved_bytes(
        create_model("fastclip-tiny"))


# ------------------------------------------------------------------------------------ patch dropout


def test_patch_dropout_keeps_cls_and_a_random_subset():
    layer = PatchDropout(0.5).train()
    x = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    y = layer(x)
    assert y.shape == (2, 1 + 8, 3)
    assert torch.equal(y[:, 0], x[:, 0])
    for sample in range(2):
        rows = {tuple(r) for r in x[sample, 1:].tolist()}
        kept = [tuple(r) for r in y[sample, 1:].tolist()]
        assert len(set(kept)) == 8 and set(kept) <= rows
    assert torch.equal(layer.eval()(x), x)


def test_patch_dropout_only_in_training():
    torch.manual_seed(0)
    plain = create_model("fastclip-tiny").eval()
    dropping = create_model("fastclip-tiny", patch_dropout=0.75).eval()
    dropping.load_state_dict(plain.state_dict())
    images, text = _inputs(plain.config)
    with torch.no_grad():
        torch.testing.assert_close(dropping.encode_image(images), plain.encode_image(images))
    dropping.train()
    seen = []
    hook = dropping.visual.ln_pre.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    loss = dropping.encode_image(images).sum()
    loss.backward()
    hook.remove()
    assert seen == [torch.Size([4, 1 + 16, 192])]  # 64 patches -> 16 kept, plus CLS


# ------------------------------------------------------------------------------------ torch.compile


def test_compile_traces_one_graph_with_autograd(tiny):
    """fullgraph=True: no graph breaks in forward; aot_eager also traces the backward."""
    torch._dynamo.reset()
    images, text = _inputs(tiny.config)
    compiled = torch.compile(tiny, backend="aot_eager", fullgraph=True)
    out = compiled(images, text)
    expected = tiny(images, text)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key], expected[key], atol=1e-6, rtol=1e-5)
    (out["image_features"].sum() + out["text_features"].sum()).backward()
    assert tiny.visual.conv1.weight.grad is not None
    tiny.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_compile_inductor_trains():
    """The default backend (inductor, C++ codegen on CPU): ~3 min on 2 cores with a cold inductor cache."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("fastclip-tiny")
    images, text = _inputs(model.config)
    compiled = torch.compile(model)
    out = compiled(images, text)
    expected = model(images, text)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key], expected[key], atol=1e-5, rtol=1e-5)
    (out["image_features"].sum() + out["text_features"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_model_is_a_clip_with_valid_no_weight_decay_names(tiny):
    resnet = fastclip.create_model("RN-Tiny")
    for model in (tiny, resnet):
        assert isinstance(model, CLIP)
        assert model.no_weight_decay() <= set(dict(model.named_parameters()))
