"""Zero-shot on a class-per-folder image directory (ImageNet-val layout), end to end through ``fastclip eval``,
against open_clip's own zero-shot pipeline on the same weights."""
import json

import numpy as np
import pytest
import torch

import fastclip
from fastclip.data.image_folder import class_folders, read_classnames
from fastclip.eval.main import main as eval_main

FOLDERS = ["n01_red_square", "n02_blue_disc", "n03_green_bar", "n04_white_dot", "n05_black_ring",
           "n06_yellow_cross", "n07_purple_star"]
NAMES = ["red square", "blue disc", "green bar", "white dot", "black ring", "yellow cross", "purple star"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}"]


def write_image_folder(root, per_class=3, size=32, seed=0):
    """ROOT/<class>/<i>.png: per class a colour of its own plus noise; one stray non-image file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, folder in enumerate(FOLDERS):
        (root / folder).mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{index}_{i}.png")
    (root / FOLDERS[0] / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder")
    torch.manual_seed(1)
    model = fastclip.create_model("fastclip-tiny", image_size=32).eval()
    weights = fastclip.model.save_model(model, tmp / "model.safetensors")
    root = write_image_folder(tmp / "val")
    (tmp / "names.txt").write_text("\n".join(NAMES) + "\n")
    (tmp / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return tmp, model, weights, root


def _open_clip_reference(model, root):
    """top-1/top-5 from open_clip's build_zero_shot_classifier and torchvision's ImageFolder."""
    open_clip = pytest.importorskip("open_clip")
    from torchvision.datasets import ImageFolder

    theirs = open_clip.model.CLIP(**model.config.to_open_clip(), output_dict=True).eval()
    theirs.load_state_dict(model.state_dict())
    dataset = ImageFolder(str(root), transform=open_clip.image_transform(32, is_train=False))
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(theirs, tokenizer=fastclip.tokenize, classnames=NAMES,
                                                          templates=TEMPLATES, device="cpu", use_tqdm=False)
        images = torch.stack([image for image, _ in dataset])
        features = torch.nn.functional.normalize(theirs.encode_image(images), dim=-1)
    ranked = (features @ classifier).topk(5, dim=1).indices
    labels = torch.tensor(dataset.targets)[:, None]
    return {"top1": (ranked[:, :1] == labels).any(1).float().mean().item(),
            "top5": (ranked == labels).any(1).float().mean().item()}


@pytest.mark.parametrize("names_format", ["txt", "json-map"])
def test_folder_zero_shot_matches_open_clip(setup, names_format, capsys):
    tmp, model, weights, root = setup
    names = tmp / "names.txt"
    if names_format == "json-map":  # shuffled keys and one extra entry: looked up by folder
        names = tmp / "names.json"
        names.write_text(json.dumps({"n99_unused": "x", **dict(reversed(list(zip(FOLDERS, NAMES))))}))
    out = tmp / f"result-{names_format}.json"
    code = eval_main(["--task", "zeroshot", "--checkpoint", str(weights), "--data", str(root), "--classnames",
                      str(names), "--templates", str(tmp / "templates.txt"), "--workers", "0",
                      "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    expected = _open_clip_reference(model, root)
    assert result["top1"] == pytest.approx(expected["top1"], abs=1e-6)
    assert result["top5"] == pytest.approx(expected["top5"], abs=1e-6)
    assert (result["images"], result["classes"], result["templates"]) == (21, 7, 2)
    assert f"top-1 {100 * expected['top1']:.1f}%, top-5 {100 * expected['top5']:.1f}%" in printed
    assert result["top1"] < result["top5"] < 1  # a non-trivial set: neither all nor nothing right


def test_default_names_are_the_folder_names(setup):
    _, _, _, root = setup
    assert class_folders(root) == FOLDERS
    assert read_classnames(None, FOLDERS)[0] == "n01 red square"
    assert read_classnames(None, ["a_b"]) == ["a b"]


@pytest.mark.parametrize("content, message", [("one\ntwo\n", "lists 2 class names but the image folder has 7"),
                                              ('{"n01_red_square": "red"}', "names no class for the folder"),
                                              ("{not json", "not valid JSON")])
def test_bad_classnames_files_exit_2(setup, content, message, capsys, tmp_path):
    _, _, weights, root = setup
    names = tmp_path / ("names.json" if content.startswith("{") else "names.txt")
    names.write_text(content)
    code = eval_main(["--task", "zeroshot", "--checkpoint", str(weights), "--data", str(root),
                      "--classnames", str(names), "--workers", "0"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_folder_errors_exit_2(setup, capsys, tmp_path):
    _, _, weights, root = setup
    (tmp_path / "empty").mkdir()
    for data, message in ((tmp_path / "empty", "holds no class folders"), (tmp_path / "nowhere", "does not exist")):
        assert eval_main(["--task", "zeroshot", "--checkpoint", str(weights), "--data", str(data)]) == 2
        assert message in capsys.readouterr().err
    assert eval_main(["--task", "retrieval", "--checkpoint", str(weights), "--data", str(root)]) == 2
    assert "serves --task zeroshot" in capsys.readouterr().err



@pytest.mark.parametrize("capability, expected", [(None, "fp32"), ((7, 5), "amp"), ((8, 0), "amp_bf16")])
def test_without_precision_eval_takes_the_trainers_default_for_the_device(setup, capsys, monkeypatch, capability,
                                                                          expected):
    """The GPU's capability is mocked; the evaluation itself runs on CPU in the mode that GPU would get."""
    import fastclip.eval.features as features
    import fastclip.eval.main as eval_module
    from fastclip.precision import autocast, default_precision

    tmp, _, weights, root = setup
    if capability is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(eval_module, "default_precision", lambda device: default_precision(torch.device("cuda")))
    used = set()
    monkeypatch.setattr(features, "autocast", lambda precision, device: used.add(precision) or autocast(precision,
                                                                                                         device))
    code = eval_main(["--task", "zeroshot", "--checkpoint", str(weights), "--data", str(root), "--classnames",
                      str(tmp / "names.txt"), "--workers", "0"])
    assert code == 0 and used == {expected}
    said = f"precision {expected} (the default on this sm" in capsys.readouterr().err
    assert said == (capability is not None)  # the CPU's fp32 goes without saying


def test_eval_loads_bf16_as_open_clip_does(setup):
    """--precision bf16 in eval: open_clip's mixed weights (matmul weights bf16, the rest fp32)."""
    open_clip = pytest.importorskip("open_clip")
    from fastclip.eval.main import load_model_for_eval

    _, model, weights, _ = setup
    loaded = load_model_for_eval(str(weights), None, torch.device("cpu"), "bf16")
    theirs = open_clip.model.CLIP(**model.config.to_open_clip(), cast_dtype=torch.bfloat16)
    open_clip.model.convert_weights_to_lp(theirs, torch.bfloat16)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in theirs.state_dict().items()}
    assert not loaded.training
