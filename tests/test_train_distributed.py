"""torchrun --nproc-per-node 2 on CPU (gloo): DDP trains, rank 0 alone logs and saves, and the result
equals a single process training on the concatenated global batch. Faults: a worker killed mid-run is
restarted by torchrun and the run ends as if nothing happened; a stalled rank cannot hang its peer."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import fastclip
from fastclip.train import checkpoint
from fastclip.train.main import main
from tests.train_utils import logged_losses, run_with_fault

STEPS = 4
#: the distributed flags of every two-process run here; checkpoints at steps 2 and 4
DDP_FLAGS = ("--local-loss", "--gather-with-grad", "--accum-freq", "2", "--save-every-n-steps", "2", "--resume", "latest")
TWO_PROCESSES = ("--standalone", "--nproc-per-node", "2")


def run_args(output_dir, batch_size, *extra):
    """fastclip-tiny at 32 px on the synthetic set, no dropout: every rank split sees the same global batch."""
    return ["--dataset-type", "synthetic", "--train-num-samples", str(16 * STEPS), "--batch-size", str(batch_size),
            "--epochs", "1", "--force-image-size", "32", "--workers", "0", "--lr", "1e-3", "--warmup", "2",
            "--seed", "5", "--no-progress", "--output-dir", str(output_dir), *extra]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "torch.distributed.run", *TWO_PROCESSES, "-m", "fastclip.train",
               *run_args(output_dir, 8, *DDP_FLAGS)]
    # a deprecated torch.distributed call fails the run (torch warns on every rank, every step)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error::FutureWarning"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    return output_dir, completed


def test_two_cpu_processes_train_and_rank_zero_saves_once(torchrun_run):
    output_dir, completed = torchrun_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [path.name for path in checkpoint.list_checkpoints(output_dir)] == ["step_00000002", f"step_{STEPS:08d}"]
    records = [json.loads(line) for line in open(output_dir / "metrics.jsonl")]
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))  # one writer, no duplicates
    results = json.loads((output_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == STEPS and results["samples_seen"] == 16 * STEPS
    assert completed.stdout.count("steps, ") == 1  # the summary line is printed by rank 0 only


def test_ddp_with_local_loss_and_accumulation_equals_one_process_on_the_global_batch(torchrun_run, tmp_path):
    output_dir, completed = torchrun_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert main(run_args(tmp_path, 16)) == 0
    distributed = load_file(str(checkpoint.list_checkpoints(output_dir)[-1] / "model.safetensors"))
    single = load_file(str(checkpoint.list_checkpoints(tmp_path)[-1] / "model.safetensors"))
    for name, expected in single.items():
        actual = distributed[name]
        if name.endswith("attn.in_proj_bias"):
            # The key bias has an identically zero gradient (softmax is shift invariant), so AdamW turns
            # the two runs' different rounding noise into updates of size lr: compare the q and v parts.
            width = expected.shape[0] // 3
            actual = torch.cat([actual[:width], actual[2 * width:]])
            expected = torch.cat([expected[:width], expected[2 * width:]])
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    torch.manual_seed(5)  # the trainer's seeded initialisation: training really moved the weights
    initial = fastclip.create_model("fastclip-tiny", image_size=32).state_dict()
    moved = max((single[name] - initial[name]).abs().max().item() for name in single)
    assert moved > 1e-3


def _same_weights(one, other):
    first = load_file(str(checkpoint.list_checkpoints(one)[-1] / "model.safetensors"))
    second = load_file(str(checkpoint.list_checkpoints(other)[-1] / "model.safetensors"))
    return all(torch.equal(first[name], second[name]) for name in first)


def test_a_worker_killed_at_step_3_is_restarted_by_torchrun_and_ends_like_the_uninterrupted_run(torchrun_run,
                                                                                                tmp_path):
    reference, completed = torchrun_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    restarted = run_with_fault("kill-after-step:3:1", run_args(tmp_path, 8, *DDP_FLAGS), timeout=600,
                               torchrun=[*TWO_PROCESSES, "--max-restarts", "1"])
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert str(-signal.SIGKILL) in restarted.stderr or "SIGKILL" in restarted.stderr  # the first attempt died
    assert "step_00000002 (step 2)" in restarted.stdout  # the second resumed from the latest checkpoint
    assert logged_losses(tmp_path) == logged_losses(reference)  # bitwise, steps 1-4
    assert _same_weights(tmp_path, reference)


def test_sigusr1_to_one_rank_stops_both_after_the_same_step_with_a_checkpoint_and_resume_is_bitwise(torchrun_run,
                                                                                                   tmp_path):
    """SLURM's --signal=USR1@120 reaching rank 1 only, after step 3: rank 0 stops after the same step (the ranks
    agree every step), checkpoint 3 is written, both exit 75; resuming under torchrun ends like the reference."""
    reference, completed = torchrun_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    stopped = run_with_fault(f"signal-after-step:3:1:{int(signal.SIGUSR1)}", run_args(tmp_path, 8, *DDP_FLAGS),
                             timeout=600, torchrun=list(TWO_PROCESSES))
    assert "exitcode  : 75" in stopped.stderr, stopped.stderr[-3000:]  # torchrun itself exits 1
    assert [path.name for path in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert max(logged_losses(tmp_path)) == 3
    assert "after step 3" in stopped.stderr and "-m fastclip.train" in stopped.stderr
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", *TWO_PROCESSES, "-m", "fastclip.train",
                              *run_args(tmp_path, 8, *DDP_FLAGS)], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_losses(tmp_path) == logged_losses(reference)  # bitwise, steps 1-4
    assert _same_weights(tmp_path, reference)


def test_a_stalled_rank_makes_its_peer_exit_after_dist_timeout_with_the_reason(tmp_path):
    started = time.monotonic()
    stalled = run_with_fault("stall-before-step:2:1", run_args(tmp_path, 8, "--dist-timeout", "10"), timeout=300,
                             torchrun=list(TWO_PROCESSES))
    assert stalled.returncode != 0
    assert "stalled or died" in stalled.stderr and "--dist-timeout 10 s" in stalled.stderr, stalled.stderr[-3000:]
    assert "exitcode  : 4" in stalled.stderr  # rank 0's status for a peer failure
    assert time.monotonic() - started < 200  # the stalled rank sleeps for an hour
