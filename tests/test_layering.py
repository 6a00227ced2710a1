"""Layers only look down: evaluation never imports the trainer (train may call eval, never the reverse)."""
import json
import subprocess
import sys

IMPORT_EVERY_EVAL_MODULE = """
import importlib, json, pkgutil, sys
import fastclip.eval
names = sorted(info.name for info in pkgutil.walk_packages(fastclip.eval.__path__, "fastclip.eval."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "train": sorted(m for m in sys.modules if m.startswith("fastclip.train"))}))
"""


def test_importing_every_eval_module_imports_no_train_module():
    completed = subprocess.run([sys.executable, "-c", IMPORT_EVERY_EVAL_MODULE], capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert {"fastclip.eval.main", "fastclip.eval.features", "fastclip.eval.embedded"} <= set(found["imported"])
    assert found["train"] == []


def test_running_an_eval_imports_no_train_module(tmp_path):
    """Not only at import: ``fastclip eval`` on a trainer checkpoint folder loads nothing of train/ either."""
    script = f"""
import json, sys
import torch
import fastclip
from fastclip.checkpoint_format import MODEL_FILE, MANIFEST_FILE, STATE_FILE, sha256_of
from fastclip.data.shapes import ShapesConfig, ensure_shapes_dataset
from fastclip.eval.main import main
folder = {str(tmp_path / "step_00000001")!r}
import pathlib
folder = pathlib.Path(folder)
folder.mkdir()
model = fastclip.create_model("fastclip-tiny", image_size=32)
from fastclip.model import save_model
save_model(model, folder / MODEL_FILE)
torch.save({{"train": {{"step": 1}}, "optimizer": {{}}, "rng": [], "world_size": 1}}, folder / STATE_FILE)
(folder / MANIFEST_FILE).write_text(json.dumps({{"format": 2, "step": 1, "model": "fastclip-tiny",
    "sha256": {{name: sha256_of(folder / name) for name in (MODEL_FILE, STATE_FILE)}}}}))
config = ShapesConfig(image_size=32, train_size=64, val_seen_size=16, val_unseen_size=16, val_shifted_size=16)
root = ensure_shapes_dataset(config, {str(tmp_path / "cache")!r})
status = main(["--task", "retrieval", "--checkpoint", str(folder), "--data", str(root / "val_seen.csv"),
               "--workers", "0"])
print(json.dumps({{"status": status, "train": sorted(m for m in sys.modules if m.startswith("fastclip.train"))}}))
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found == {"status": 0, "train": []}
