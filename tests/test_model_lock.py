"""LiT locks (fastclip.model.lock): the same frozen set as open_clip, no gradient, no optimiser state."""
import pytest
import torch

import fastclip
from fastclip.model import CONFIGS, FrozenBatchNorm2d
from fastclip.train.optim import build_optimizer

open_clip = pytest.importorskip("open_clip")

VIT_GROUPS = CONFIGS["fastclip-tiny"].vision.layers + 2   # stem, blocks but the last, last + ln_post, proj
TEXT_GROUPS = CONFIGS["fastclip-tiny"].text.layers + 2    # embeddings, blocks but the last, last + ln_final, proj


def _pair(name: str):
    """fastclip and open_clip models of config ``name`` with the same state-dict names."""
    torch.manual_seed(0)
    ours = fastclip.create_model(name)
    theirs = open_clip.model.CLIP(**CONFIGS[name].to_open_clip())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    return ours, theirs


def _frozen(model) -> set:
    return {name for name, parameter in model.named_parameters() if not parameter.requires_grad}


@pytest.mark.parametrize("unlocked_groups", [0, 1, 2, VIT_GROUPS - 1, VIT_GROUPS, VIT_GROUPS + 2])
def test_image_lock_freezes_what_open_clip_freezes(unlocked_groups):
    ours, theirs = _pair("fastclip-tiny")
    ours.lock_image_tower(unlocked_groups=unlocked_groups)
    theirs.lock_image_tower(unlocked_groups=unlocked_groups)
    assert _frozen(ours) == _frozen(theirs)
    visual = {name for name, _ in ours.named_parameters() if name.startswith("visual.")}
    if unlocked_groups == 0:
        assert _frozen(ours) == visual
    assert (not _frozen(ours)) == (unlocked_groups >= VIT_GROUPS)


@pytest.mark.parametrize("unlocked_layers", [0, 1, 2, TEXT_GROUPS - 1, TEXT_GROUPS + 1])
def test_text_lock_freezes_what_open_clip_freezes(unlocked_layers):
    ours, theirs = _pair("fastclip-tiny")
    ours.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=True)
    theirs.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=True)
    assert _frozen(ours) == _frozen(theirs)
    assert not any(name.startswith("visual.") for name in _frozen(ours))


def test_text_lock_without_freeze_layer_norm_keeps_the_norms_trainable():
    ours, theirs = _pair("fastclip-tiny")
    ours.lock_text_tower(unlocked_layers=1, freeze_layer_norm=False)
    theirs.lock_text_tower(unlocked_layers=1, freeze_layer_norm=True)
    norms = {name for name in _frozen(theirs) if ".ln_" in name or name.startswith("ln_final")}
    assert norms, "the locked text blocks hold LayerNorms"
    assert _frozen(ours) == _frozen(theirs) - norms


def test_resnet_lock_and_frozen_batch_norm_stats():
    ours, theirs = _pair("RN-Tiny")
    size = CONFIGS["RN-Tiny"].vision.image_size
    with torch.no_grad():  # running statistics away from their (0, 1) init
        ours.train()(torch.randn(6, 3, size, size) * 3 + 1, None)
    ours.lock_image_tower(freeze_bn_stats=True)
    theirs.lock_image_tower()
    assert _frozen(ours) == _frozen(theirs)
    theirs.lock_image_tower(freeze_bn_stats=True)  # open_clip's frozen BN holds weights as buffers
    assert all(name.startswith("visual.") for name in _frozen(ours))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and not isinstance(m, FrozenBatchNorm2d)
                   for m in ours.visual.modules())
    assert set(ours.state_dict()) == set(fastclip.create_model("RN-Tiny").state_dict())
    # open_clip's FrozenBatchNorm2d: running statistics used and kept in training too
    theirs.load_state_dict(ours.state_dict(), strict=False)
    before = {k: v.clone() for k, v in ours.visual.state_dict().items() if "running" in k}
    images = torch.randn(5, 3, size, size)
    ours.train(), theirs.train()
    torch.testing.assert_close(ours.visual(images), theirs.visual(images), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.visual(images), ours.eval().visual(images), rtol=0, atol=0)
    for key, value in ours.visual.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="ViT image tower"):
        fastclip.create_model("RN-Tiny").lock_image_tower(unlocked_groups=1)


@pytest.mark.parametrize("count", [-1, 1.5, True])
def test_bad_counts_are_value_errors(count):
    model = fastclip.create_model("fastclip-tiny")
    with pytest.raises(ValueError, match=">= 0"):
        model.lock_image_tower(unlocked_groups=count)
    with pytest.raises(ValueError, match=">= 0"):
        model.lock_text_tower(unlocked_layers=count)


def test_a_step_leaves_the_locked_towers_alone():
    """After a training step: frozen parameters bit-equal, their .grad None, no AdamW state for them;
    the trainable ones moved and hold state."""
    from fastclip.loss import ClipLoss

    torch.manual_seed(0)
    model = fastclip.create_model("fastclip-tiny", image_size=32)
    model.lock_image_tower(unlocked_groups=1)
    model.lock_text_tower(unlocked_layers=2)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    optimizer, _ = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    images = torch.randn(37, 3, 32, 32)
    tokens = fastclip.tokenize([f"caption {i}" for i in range(37)], context_length=77)
    loss = ClipLoss()(**model(images, tokens))
    loss.backward()
    parameters = dict(model.named_parameters())
    assert all(parameters[name].grad is None for name in frozen)
    assert all(parameters[name].grad is not None for name in trainable)
    optimizer.step()
    held = {id(p) for p in optimizer.state}
    for name, value in frozen.items():
        assert torch.equal(parameters[name], value), name
        assert id(parameters[name]) not in held, name
    assert all(id(parameters[name]) in held for name in trainable)
    assert sum(not torch.equal(parameters[name], value) for name, value in trainable.items()) == len(trainable)
