"""``pretrained=``: open_clip tags resolve to weights already in the local caches (built here as fake
caches in tmp folders, with tiny models), trainer checkpoint folders load at the size they were
trained at, and whatever is missing is a ValueError naming where fastclip looked. Never the network."""
import contextlib
import io
import json
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

import fastclip
from fastclip.model import CONFIGS, create_model, save_model
from fastclip.model.pretrained import (WeightsNotFoundError, clip_url_cache_dir, hub_cache_dir,
                                       resolve_pretrained)

open_clip = pytest.importorskip("open_clip")

TINY = "fastclip-tiny"
PARITY_ATOL = 1e-5  # encode_image / encode_text max abs difference, fp32 (docs/design.md, the model)
HF_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"fastclip tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and open_clip caches under tmp_path (HF_HUB_CACHE and HOME point there)."""
    for variable in HF_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def _put_in_hub_cache(repo_id, filename, write, revision="0123456789abcdef0123456789abcdef01234567"):
    """The huggingface_hub layout: refs/main holds the commit, snapshots/<commit>/<file> the file."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    target = repo / "snapshots" / revision / filename
    target.parent.mkdir(parents=True)
    write(target)
    return target


def _open_clip_tiny(seed=3):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**CONFIGS[TINY].to_open_clip()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def _assert_same_features(ours, theirs, image_size):
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    text = fastclip.tokenize(["a red circle", "two blue squares on grass", "x"])
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            inputs = images if encode == "encode_image" else text
            difference = (getattr(ours.eval(), encode)(inputs) - getattr(theirs.eval(), encode)(inputs)).abs().max()
            assert difference <= PARITY_ATOL, f"{encode}: max abs difference {difference:.2e}"


# ------------------------------------------------------------------------------ open_clip tags


def test_a_tag_loads_from_the_hugging_face_cache_without_network(caches, monkeypatch):
    theirs = _open_clip_tiny()
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY,  # a registry entry for the tiny config
                        {"tinytag": {"url": "", "hf_hub": "fake-org/fastclip-tiny-clip/"}})
    path = _put_in_hub_cache("fake-org/fastclip-tiny-clip", "open_clip_model.safetensors",
                             lambda target: save_file(theirs.state_dict(), str(target)))
    assert resolve_pretrained("tinytag", TINY).path == path
    _assert_same_features(create_model(TINY, pretrained="tinytag"), theirs, CONFIGS[TINY].vision.image_size)
    _assert_same_features(create_model(TINY, pretrained="hf-hub:fake-org/fastclip-tiny-clip"), theirs,
                          CONFIGS[TINY].vision.image_size)


def test_the_tags_activation_wins_over_the_names(caches, monkeypatch):
    theirs = _open_clip_tiny()
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY,
                        {"quick": {"url": "", "hf_hub": "fake-org/quick/", "quick_gelu": True}})
    _put_in_hub_cache("fake-org/quick", "open_clip_pytorch_model.bin",  # the .bin when there is no safetensors
                      lambda target: torch.save(theirs.state_dict(), target))
    with pytest.warns(UserWarning, match="trained with QuickGELU"):
        model = create_model(TINY, pretrained="quick")
    assert model.config.quick_gelu


def test_without_a_name_the_hub_repos_open_clip_config_gives_the_activation(caches):
    """open_clip's Hub repositories hold open_clip_config.json beside the weights; GELU models omit quick_gelu."""
    theirs = _open_clip_tiny()
    path = _put_in_hub_cache("fake-org/gelu", "open_clip_model.safetensors",
                             lambda target: save_file(theirs.state_dict(), str(target)))
    model_cfg = {key: value for key, value in CONFIGS[TINY].to_open_clip().items() if key != "quick_gelu"}
    (path.parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing guessed: the activation is read, not assumed
        for pretrained in ("hf-hub:fake-org/gelu", path):
            model = create_model(pretrained=pretrained)
            assert model.config == CONFIGS[TINY]
            _assert_same_features(model, theirs, CONFIGS[TINY].vision.image_size)


def test_real_registry_entries_point_into_the_caches(caches):
    """open_clip's own (name, tag) -> Hub repository / URL file mapping, with placeholder files."""
    hub_file = _put_in_hub_cache("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors",
                                 lambda target: target.write_bytes(b"placeholder"))
    assert resolve_pretrained("laion2b_s34b_b79k", "ViT-B-32").path == hub_file
    assert resolve_pretrained("LAION2B-S34B-B79K", "ViT-B-32").path == hub_file  # open_clip's tag spelling rules
    url_file = clip_url_cache_dir() / "RN50.pt"  # OpenAI's URL, as open_clip caches it
    url_file.parent.mkdir(parents=True)
    url_file.write_bytes(b"placeholder")
    found = resolve_pretrained("openai", "RN50")
    assert found.path == url_file and found.quick_gelu is True


def test_a_missing_tag_says_where_it_looked_and_how_to_fetch(caches):
    with pytest.raises(WeightsNotFoundError) as error:
        create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert str(hub_cache_dir() / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K") in message
    assert "open_clip_model.safetensors" in message and "never downloads" in message
    assert "open_clip.create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')" in message
    with pytest.raises(WeightsNotFoundError, match=r"\.cache/clip/ViT-B-32\.pt"):
        create_model("ViT-B-32", pretrained="openai")
    with pytest.raises(ValueError, match="tags for ViT-B-32: .*laion2b_s34b_b79k"):
        create_model("ViT-B-32", pretrained="no_such_tag")
    with pytest.raises(ValueError, match="publishes no weights for 'RN-Tiny'"):
        create_model("RN-Tiny", pretrained="openai")
    with pytest.raises(ValueError, match="needs the model name"):
        create_model(None, pretrained="openai")
    with pytest.raises(ValueError, match="should name a repository"):
        create_model(TINY, pretrained="hf-hub:just-an-org")


def test_hub_cache_folder_follows_huggingface_hub(tmp_path, monkeypatch):
    """Our reading of HF_HUB_CACHE / HUGGINGFACE_HUB_CACHE / HF_HOME / XDG_CACHE_HOME equals huggingface_hub's."""
    pytest.importorskip("huggingface_hub")
    settings = [{}, {"XDG_CACHE_HOME": "xdg"}, {"XDG_CACHE_HOME": "xdg", "HF_HOME": "home"},
                {"HF_HOME": "home", "HUGGINGFACE_HUB_CACHE": "legacy"},
                {"HF_HOME": "home", "HUGGINGFACE_HUB_CACHE": "legacy", "HF_HUB_CACHE": "hub"}]
    settings = [{key: str(tmp_path / value) for key, value in setting.items()} for setting in settings]
    script = ("import importlib, json, os, sys\nimport huggingface_hub.constants as c\nout = []\n"
              "for setting in json.loads(sys.argv[1]):\n"
              "    for key in %r: os.environ.pop(key, None)\n"
              "    os.environ.update(setting); out.append(importlib.reload(c).HF_HUB_CACHE)\n"
              "print(json.dumps(out))" % (HF_VARIABLES,))
    theirs = json.loads(subprocess.run([sys.executable, "-c", script, json.dumps(settings)], capture_output=True,
                                       text=True, check=True, env={"HOME": str(tmp_path), "PATH": ""}).stdout)
    monkeypatch.setenv("HOME", str(tmp_path))
    for setting, expected in zip(settings, theirs):
        for variable in HF_VARIABLES:
            monkeypatch.delenv(variable, raising=False)
        for key, value in setting.items():
            monkeypatch.setenv(key, value)
        assert str(hub_cache_dir()) == expected, setting


# ------------------------------------------------------------------------------ checkpoint folders


@pytest.fixture(scope="module")
def trained_at_32px(tmp_path_factory):
    """The issue's run, shortened: ``fastclip train --model RN-Tiny --force-image-size 32`` (synthetic data)."""
    from fastclip.train.main import main as train_main

    output = tmp_path_factory.mktemp("run")
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_main(["--model", "RN-Tiny", "--force-image-size", "32", "--dataset-type", "synthetic",
                           "--train-num-samples", "16", "--batch-size", "16", "--epochs", "1", "--workers", "0",
                           "--output-dir", str(output), "--no-progress"]) == 0
    (checkpoint,) = sorted((output / "checkpoints").iterdir())
    return output, checkpoint


def test_a_checkpoint_folder_reloads_at_its_trained_image_size(trained_at_32px):
    output, checkpoint = trained_at_32px
    from_folder = create_model("RN-Tiny", pretrained=checkpoint)  # the name's default is 64 px
    assert from_folder.config.vision.image_size == 32
    without_name = create_model(None, pretrained=checkpoint)
    assert without_name.config == from_folder.config
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.equal(value, weights[key]) for key, value in from_folder.state_dict().items())
    with pytest.raises(ValueError, match=r"image_size=32.*--force-image-size 32"):
        create_model("RN-Tiny", pretrained=checkpoint, image_size=64)  # ResNet position embeddings do not resize
    with pytest.raises(WeightsNotFoundError, match=f"e.g. the newest: {checkpoint}"):
        create_model("RN-Tiny", pretrained=output)
    with pytest.raises(WeightsNotFoundError, match="holds no model.safetensors"):
        create_model("RN-Tiny", pretrained=output / "checkpoints")


def test_trainer_pretrained_flag(trained_at_32px, tmp_path, capsys):
    """--pretrained takes a checkpoint folder (trained further at its 32 px), and a tag that is not
    cached exits 2 with the message instead of a traceback."""
    from fastclip.train.main import main as train_main

    _, checkpoint = trained_at_32px
    common = ["--dataset-type", "synthetic", "--train-num-samples", "16", "--batch-size", "16", "--epochs", "1",
              "--workers", "0", "--save-frequency", "0", "--no-progress"]
    assert train_main(["--model", "RN-Tiny", "--pretrained", str(checkpoint), "--output-dir", str(tmp_path / "a"),
                       *common]) == 0
    assert json.loads((tmp_path / "a" / "results.json").read_text())["steps"] == 1
    capsys.readouterr()
    assert train_main(["--pretrained", "openai", "--output-dir", str(tmp_path / "b"), *common]) == 2
    assert "open_clip publishes no weights for 'fastclip-tiny'" in capsys.readouterr().err


def test_save_model_leaves_no_temporary_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    model = create_model(TINY)
    path = save_model(model, tmp_path / "model.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_model(model, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
