"""Weights move between open_clip / OpenAI formats and fastclip with exact parity (<= 1e-5, fp32)."""
import copy
import os
import pickle
import warnings

import pytest
import torch
from safetensors.torch import save_file

import fastclip
from fastclip.model import CONFIGS, create_model, infer_config, model_from_state_dict, save_model
from tests.model_utils import perturb

open_clip = pytest.importorskip("open_clip")

PARITY_NAMES = ["RN50", "ViT-B-32", "ViT-B-32-quickgelu", "fastclip-tiny"]
PARITY_ATOL = 1e-5  # max abs difference of encode_image / encode_text, fp32 (docs/design.md, the model)
CAPTIONS = ["a photo of a cat", "two red circles and a blue square on a striped background, drawn by hand"]


def _open_clip_model(name, seed=0):
    torch.manual_seed(seed)
    if name in open_clip.list_models():
        model = open_clip.create_model(name, pretrained=None)
    else:
        model = open_clip.model.CLIP(**CONFIGS[name].to_open_clip())
    perturb(model, seed)
    return model.eval()


def _inputs(name, batch=2):
    size = CONFIGS[name].vision.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return images, fastclip.tokenize(CAPTIONS[:batch])


def _encode(model, images, text):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


def _assert_parity(model, expected, images, text, label):
    image_features, text_features = _encode(model.eval(), images, text)
    for which, ours, theirs in (("image", image_features, expected[0]), ("text", text_features, expected[1])):
        difference = (ours - theirs).abs().max().item()
        assert difference <= PARITY_ATOL, f"{label}: encode_{which} max abs diff {difference:.2e} > {PARITY_ATOL}"


def _to_openai_format(state_dict, name):
    """What OpenAI's archives hold: the same keys plus three int entries (fastclip drops them)."""
    config = CONFIGS[name]
    converted = dict(state_dict)
    converted["input_resolution"] = torch.tensor(config.vision.image_size)
    converted["context_length"] = torch.tensor(config.text.context_length)
    converted["vocab_size"] = torch.tensor(config.text.vocab_size)
    return converted


@pytest.fixture(scope="module", params=PARITY_NAMES)
def reference(request):
    name = request.param
    model = _open_clip_model(name)
    images, text = _inputs(name)
    return name, model, (images, text), _encode(model, images, text)


def test_open_clip_format_parity(reference):
    name, model, (images, text), expected = reference
    ours = model_from_state_dict(model.state_dict(), name=name)
    _assert_parity(ours, expected, images, text, f"{name} (open_clip format)")


def test_openai_format_parity_with_inferred_config(reference):
    name, model, (images, text), expected = reference
    openai_state_dict = _to_openai_format(model.state_dict(), name)
    quick_gelu = name.endswith("-quickgelu")
    assert infer_config(openai_state_dict, quick_gelu=quick_gelu) == CONFIGS[name]
    if quick_gelu:  # nothing said about the activation: QuickGELU, as OpenAI's build_model, with a warning
        with pytest.warns(UserWarning, match="assuming QuickGELU"):
            ours = model_from_state_dict(openai_state_dict)
    else:
        ours = model_from_state_dict(openai_state_dict, quick_gelu=False)
    assert ours.config == CONFIGS[name]
    _assert_parity(ours, expected, images, text, f"{name} (OpenAI format, inferred config)")


def test_reverse_direction_loads_strictly_into_open_clip(reference):
    name, model, (images, text), _ = reference
    ours = model_from_state_dict(model.state_dict(), name=name).eval()
    perturb(ours, seed=123)  # weights open_clip's model does not have yet
    theirs = copy.deepcopy(model)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    _assert_parity(ours, _encode(theirs, images, text), images, text, f"{name} (fastclip -> open_clip)")


# ---------------------------------------------------------------------------- file formats (small config)

TINY = "fastclip-tiny"


@pytest.fixture(scope="module")
def tiny_reference():
    model = _open_clip_model(TINY, seed=5)
    images, text = _inputs(TINY)
    return model, (images, text), _encode(model, images, text)


def _training_checkpoint(state_dict):
    return {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}


@pytest.mark.parametrize("layout", ["plain.pt", "plain.bin", "plain.safetensors", "training.pt",
                                    "custom_text.pt", "openai_fp32.pt"])
def test_checkpoint_files_load_with_parity(tmp_path, tiny_reference, layout):
    model, (images, text), expected = tiny_reference
    state_dict = model.state_dict()
    kind, suffix = layout.split(".")
    if kind == "training":
        payload = _training_checkpoint(state_dict)
    elif kind == "custom_text":  # open_clip CustomTextCLIP: the text tower under "text."
        payload = open_clip.model.convert_to_custom_text_state_dict(state_dict)
        assert any(k.startswith("text.transformer.") for k in payload)
    elif kind == "openai_fp32":
        payload = _to_openai_format(state_dict, TINY)
    else:
        payload = state_dict
    path = tmp_path / f"weights.{suffix}"
    if suffix == "safetensors":
        save_file({k: v.contiguous() for k, v in payload.items()}, str(path))
    else:
        torch.save(payload, path)
    _assert_parity(create_model(TINY, pretrained=path), expected, images, text, layout)


def test_fp16_openai_weights_load_into_fp32(tiny_reference):
    model, (images, text), expected = tiny_reference
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ours = model_from_state_dict(half, name=TINY)
    assert ours.visual.conv1.weight.dtype == torch.float32
    image_features, text_features = _encode(ours.eval(), images, text)
    assert (image_features - expected[0]).abs().max() < 2e-2 and (text_features - expected[1]).abs().max() < 2e-2


def test_save_model_round_trip(tmp_path, tiny_reference):
    model, (images, text), expected = tiny_reference
    ours = model_from_state_dict(model.state_dict(), name=TINY)
    path = save_model(ours, tmp_path / "model.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # nothing half-written left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stored config says GELU: no activation guess
        loaded = model_from_state_dict(path)
    assert loaded.config == CONFIGS[TINY]
    _assert_parity(loaded, expected, images, text, "save_model round trip")
    _assert_parity(create_model(None, pretrained=path), expected, images, text, "create_model(None, pretrained)")
    theirs = open_clip.model.CLIP(**CONFIGS[TINY].to_open_clip()).eval()
    open_clip.load_checkpoint(theirs, str(path))  # open_clip reads fastclip's file too
    _assert_parity(loaded, _encode(theirs, images, text), images, text, "open_clip reads save_model")
    with pytest.raises(ValueError, match="safetensors"):
        save_model(ours, tmp_path / "model.pt")


def _sized_open_clip_model(name, image_size, seed=11):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**CONFIGS[name].replace(image_size=image_size).to_open_clip())
    perturb(model, seed)
    return model.eval()


@pytest.mark.parametrize("source", ["trainer checkpoint", "OpenAI", "open_clip"])
def test_create_model_without_a_name_reads_the_architecture_and_image_size(tmp_path, source):
    """Each at an image size its config name does not have: the one the weights were trained at comes back."""
    if source == "trainer checkpoint":  # the folder's weights record the whole config (the manifest: the name)
        from fastclip.train.checkpoint import save_checkpoint

        reference = create_model("fastclip-tiny", image_size=32).eval()
        perturb(reference, seed=4)
        path = save_checkpoint(tmp_path, 7, reference, {}, model_name="fastclip-tiny")
        expected_config, options = reference.config, {}
    elif source == "OpenAI":  # QuickGELU, an int input_resolution entry, the image size in the position embedding
        reference = _sized_open_clip_model("RN-Tiny-quickgelu", 96)
        path = tmp_path / "openai.pt"
        torch.save(_to_openai_format(reference.state_dict(), "RN-Tiny-quickgelu"), path)
        expected_config, options = CONFIGS["RN-Tiny-quickgelu"].replace(image_size=96), {}
    else:  # an open_clip training checkpoint of a GELU ViT: the activation is not in the weights, so it is named
        reference = _sized_open_clip_model("fastclip-tiny", 48)
        path = tmp_path / "epoch_3.pt"
        torch.save(_training_checkpoint(reference.state_dict()), path)
        expected_config, options = CONFIGS["fastclip-tiny"].replace(image_size=48), {"quick_gelu": False}
    size = expected_config.vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    text = fastclip.tokenize(CAPTIONS)
    expected = _encode(reference, images, text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fastclip.create_model(pretrained=path, **options)
    guessed = [str(warning.message) for warning in caught if "assuming QuickGELU" in str(warning.message)]
    assert len(guessed) == (source == "OpenAI")  # OpenAI's build_model's guess, said; nothing guessed otherwise
    assert loaded.config == expected_config
    _assert_parity(loaded, expected, images, text, f"create_model(pretrained=<{source}>)")


def test_sizes_resized_on_load(tiny_reference):
    model, (_, text), expected = tiny_reference
    bigger = model_from_state_dict(model.state_dict(), name=TINY, image_size=96)
    assert bigger.visual.positional_embedding.shape[0] == 12 * 12 + 1
    assert bigger.encode_image(torch.randn(1, 3, 96, 96)).shape == (1, 128)
    shorter = model_from_state_dict(model.state_dict(), name=TINY, context_length=32)
    with torch.no_grad():
        features = shorter.eval().encode_text(text[:, :32])
    assert (features - expected[1]).abs().max() <= PARITY_ATOL  # captions fit in 32: same features


# ---------------------------------------------------------------------------- errors and safety


def test_mismatched_checkpoint_lists_keys_and_likely_config(tmp_path, tiny_reference):
    model = tiny_reference[0]
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ValueError) as error:
        create_model("RN-Tiny", pretrained=path)
    message = str(error.value)
    assert "missing keys" in message and "visual.attnpool.c_proj.bias" in message
    assert "unexpected keys" in message and "visual.class_embedding" in message
    assert "looks like fastclip-tiny" in message
    with pytest.raises(ValueError, match=r"shape mismatches \(\d+\)"):
        create_model("ViT-Tiny-16", pretrained=path)
    partial = {k: v for k, v in model.state_dict().items() if k != "ln_final.bias"}
    with pytest.raises(ValueError, match=r"missing keys \(1\):\n    ln_final.bias"):
        model_from_state_dict(partial, name=TINY)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fastclip_pickle_ran",))


def test_pickled_code_is_never_run(tmp_path):
    marker = "/tmp/fastclip_pickle_ran"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"visual.proj": _Payload()}, handle, protocol=2)
    with pytest.raises((ValueError, RuntimeError)):
        model_from_state_dict(path)
    assert not os.path.exists(marker)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(ValueError, match="TorchScript archive"):
        create_model(TINY, pretrained=path)


def test_other_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint extension"):
        (tmp_path / "w.npz").write_bytes(b"")
        create_model(TINY, pretrained=tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError):
        create_model(TINY, pretrained=tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        model_from_state_dict({"weight": torch.zeros(2)}, quick_gelu=False)
    with pytest.raises(ValueError, match="give a model name"):
        create_model(None)
