"""--fsdp (FSDP2) against DDP on two gloo ranks: the same per-step losses and final weights, with and without
--accum-freq 2 + --grad-checkpointing; --fsdp-checkpoint full writes what DDP writes, and an FSDP run resumes
from it step-exactly. Flag errors exit 2.

The four runs share one spawned world (the trainer's ``run`` is called with the world's ranks), so the
processes start once.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastclip.train import checkpoint
from fastclip.train.main import main
from tests.distributed_utils import run_in_world
from tests.train_utils import train_runs_in_world

STEPS = 4
RELATIVE = 1e-5  # the bar; the runs agree far closer (same reductions, sums of two values)
VARIANTS = {  # name: extra TrainConfig fields; each runs under DDP and under --fsdp
    "plain": {},
    "accum2+ckpt": {"accum_freq": 2, "grad_checkpointing": True, "save_every_n_steps": 2},
}
RESUMED = "fsdp-resumed"  # the FSDP accum2+ckpt run again from its full (gathered) checkpoint of step 2


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_parity")
    runs = [(f"{engine}-{name}", {**extra, "fsdp": engine == "fsdp"})
            for name, extra in VARIANTS.items() for engine in ("ddp", "fsdp")]
    runs.append((RESUMED, {**VARIANTS["accum2+ckpt"], "fsdp": True,
                           "resume": str(root / "fsdp-accum2+ckpt" / "checkpoints" / "step_00000002")}))
    run_in_world(train_runs_in_world, 2, timeout_s=600, root=str(root), runs=runs, steps=STEPS)
    return root


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(folder / "metrics.jsonl")]


def _final_weights(folder: Path) -> dict:
    return load_file(str(checkpoint.list_checkpoints(folder)[-1] / "model.safetensors"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp_per_step_losses_and_final_weights_equal_ddp(world_runs, variant):
    ddp, fsdp = world_runs / f"ddp-{variant}", world_runs / f"fsdp-{variant}"
    expected, actual = _losses(ddp), _losses(fsdp)
    assert len(expected) == len(actual) == STEPS
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=RELATIVE, atol=0)
    reference, sharded = _final_weights(ddp), _final_weights(fsdp)  # FSDP's: gathered to rank 0
    assert sorted(sharded) == sorted(reference)
    for name, value in reference.items():
        assert sharded[name].shape == value.shape and sharded[name].dtype == value.dtype, name
        torch.testing.assert_close(sharded[name], value, rtol=RELATIVE, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # the gathered optimizer state is torch.optim's own form, as DDP writes it
    saved = [torch.load(checkpoint.list_checkpoints(folder)[-1] / "state.pt", weights_only=True)["optimizer"]
             for folder in (ddp, fsdp)]
    assert sorted(saved[1]["state"]) == sorted(saved[0]["state"])
    for index, values in saved[0]["state"].items():
        torch.testing.assert_close(saved[1]["state"][index]["exp_avg_sq"], values["exp_avg_sq"], rtol=1e-4, atol=1e-12)


def test_fsdp_resumes_its_gathered_checkpoint_step_exactly(world_runs):
    """A full checkpoint goes back into the shards (weights and torch.optim-form optimizer state): the run
    resumed at step 2 ends where the uninterrupted one did."""
    uninterrupted, resumed = world_runs / "fsdp-accum2+ckpt", world_runs / RESUMED
    assert _losses(resumed) == _losses(uninterrupted)[2:]
    expected, actual = _final_weights(uninterrupted), _final_weights(resumed)
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


@pytest.mark.parametrize("flags, message", [
    (["--fsdp-checkpoint", "sharded"], "add --fsdp"),
    (["--fsdp-offload-cpu"], "add --fsdp"),
    (["--fsdp", "--precision", "amp"], "not supported with --fsdp"),
])
def test_fsdp_flag_errors_exit_2_with_the_fix(tmp_path, capsys, flags, message):
    status = main(["--dataset-type", "synthetic", "--output-dir", str(tmp_path / "run"), *flags])
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
