"""Helpers shared by the trainer's robustness tests: tiny runs, their losses, tiny checkpoints, faulty runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import fastclip
from fastclip.model import CLIPConfig, TextConfig, VisionConfig

FAULT_WORKER = str(Path(__file__).with_name("fault_worker.py"))


def synthetic_run_args(output_dir, *extra):
    """6 fp32 CPU steps of fastclip-tiny at 32 px on 48 synthetic samples, checkpoints at steps 2, 4, 6 (the
    newest two kept), patch dropout on so that RNG state matters on resume."""
    return ["--dataset-type", "synthetic", "--train-num-samples", "48", "--batch-size", "8", "--epochs", "1",
            "--force-image-size", "32", "--workers", "0", "--patch-dropout", "0.25", "--lr", "1e-3", "--warmup", "2",
            "--seed", "3", "--no-progress", "--save-every-n-steps", "2", "--keep-last", "2",
            *(["--output-dir", str(output_dir)] if output_dir is not None else []), *extra]


def logged_losses(output_dir, name="metrics.jsonl"):
    """{step: loss} of the train lines of ``metrics.jsonl``; every step must appear once."""
    records = [json.loads(line) for line in open(Path(output_dir) / name)]
    steps = [record["step"] for record in records if record["kind"] == "train"]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {record["step"]: record["loss"] for record in records if record["kind"] == "train"}


def run_with_fault(fault: str, argv, timeout=300, torchrun=None, own_session=False):
    """Run tests/fault_worker.py (under ``torchrun`` flags when given) with FASTCLIP_TEST_FAULT=fault;
    ``own_session``: in a process group of its own (for faults that signal the whole group)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    environment = {**os.environ, "FASTCLIP_TEST_FAULT": fault}  # the same thread count as this process: same sums
    if torchrun:
        environment["OMP_NUM_THREADS"] = "1"
    return subprocess.run([*launcher, FAULT_WORKER, *argv], capture_output=True, text=True, timeout=timeout,
                          env=environment, start_new_session=own_session)


def tiny_clip() -> torch.nn.Module:
    """A CLIP of a few thousand parameters (vocabulary of 64): checkpoints of a few hundred kB."""
    config = CLIPConfig(8, VisionConfig(image_size=16, layers=1, width=16, patch_size=8, head_width=8),
                        TextConfig(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
    return fastclip.model.CLIP(config)


def tiny_state(step: int) -> dict:
    """The smallest training state ``load_training_checkpoint`` accepts."""
    return {"train": {"step": step}, "optimizer": {}, "rng": [], "world_size": 1, "batch_size": 8}


def train_runs_in_world(rank, world_size, root, runs, steps=4):
    """On each rank of a spawned world (``distributed_utils.run_in_world``): the trainer's ``run`` once per
    ``(name, TrainConfig fields)`` of ``runs``, into ``root/name``: fastclip-tiny at 32 px, fp32, ``steps`` steps
    of 4 samples per rank, the distributed loss with --local-loss --gather-with-grad, a checkpoint at the end."""
    from fastclip.distributed.comm import World
    from fastclip.train.config import TrainConfig
    from fastclip.train.main import run

    for name, extra in runs:
        fields = {"model": "fastclip-tiny", "local_loss": True, "gather_with_grad": True, **extra}
        config = TrainConfig(dataset_type="synthetic", train_num_samples=4 * world_size * steps, batch_size=4,
                             epochs=1, force_image_size=32, workers=0, lr=1e-3, warmup=2, seed=5, no_progress=True,
                             output_dir=f"{root}/{name}", **fields)
        run(config, World(rank=rank, size=world_size))
