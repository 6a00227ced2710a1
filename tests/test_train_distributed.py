"""torchrun --nproc-per-node 2 on CPU (gloo): DDP trains, rank 0 alone logs and saves, and the result
equals a single process training on the concatenated global batch. Faults: a worker killed mid-run is
restarted by torchrun and the run ends as if nothing happened; a stalled rank cannot hang its peer.

Scale-out (docs/scale_out.md), each compared with that run: two torchrun "nodes" meeting over c10d on
127.0.0.1, two srun-style tasks without torchrun, and --fsdp with sharded checkpoints through a killed worker;
its sharded checkpoint then loads in one process and resumes there past a corrupt shard."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import fastclip
from fastclip.checkpoint_format import CorruptCheckpointError
from fastclip.train import checkpoint
from fastclip.train.launch_env import PORT_BASE, PORT_SPAN
from fastclip.train.main import main
from tests.distributed_utils import free_port
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


# --- scale-out: two nodes over c10d, srun without torchrun, FSDP with sharded checkpoints (docs/scale_out.md) ---

def _environment(**extra):
    """This environment without any launcher's variables, single-threaded as the reference run."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    environment = {key: value for key, value in os.environ.items()
                   if key not in launcher and not key.startswith("SLURM_")}
    return {**environment, "OMP_NUM_THREADS": "1", **extra}


def _wait_all(processes, timeout=600):
    return [process.communicate(timeout=timeout) + (process.returncode,) for process in processes]


def test_two_nodes_rendezvous_over_c10d_and_give_the_one_node_losses(torchrun_run, tmp_path):
    reference, completed = torchrun_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "two-nodes", "-m", "fastclip.train", *run_args(tmp_path, 8, *DDP_FLAGS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())
             for node in (0, 1)]
    for stdout, stderr, status in _wait_all(nodes):
        assert status == 0, stderr[-3000:]
    assert logged_losses(tmp_path) == logged_losses(reference)  # bitwise, steps 1-4
    assert _same_weights(tmp_path, reference)


def _slurm_job_id() -> int:
    """A job id whose derived MASTER_PORT (launch_env) is free here."""
    for _ in range(50):
        job_id = random.randrange(PORT_SPAN)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", PORT_BASE + job_id))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port in the SLURM-derived range")


def _slurm_task(rank: int, ntasks: int, job_id: int, argv):
    environment = _environment(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(rank),
                               SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID=str(job_id))
    return subprocess.Popen([sys.executable, "-m", "fastclip.train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment)


def test_srun_style_tasks_without_torchrun_train_as_one_world_with_a_derived_master(torchrun_run, tmp_path):
    reference, completed = torchrun_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    job_id = _slurm_job_id()
    (out0, err0, status0), (_, err1, status1) = _wait_all(
        [_slurm_task(rank, 2, job_id, run_args(tmp_path, 8, *DDP_FLAGS)) for rank in (0, 1)])
    assert status0 == 0 and status1 == 0, err0[-2000:] + err1[-2000:]
    assert "MASTER_ADDR=127.0.0.1 (the first host of SLURM_JOB_NODELIST" in out0
    assert f"MASTER_PORT={PORT_BASE + job_id} (from SLURM_JOB_ID={job_id})" in out0
    assert logged_losses(tmp_path) == logged_losses(reference)


def test_a_rendezvous_that_never_completes_ends_after_dist_timeout_with_the_reason(tmp_path):
    started = time.monotonic()
    alone = _slurm_task(0, 2, _slurm_job_id(), run_args(tmp_path, 8, "--dist-timeout", "3"))
    (_, stderr, status), = _wait_all([alone], timeout=300)
    assert status == 4, stderr[-3000:]
    assert "not all 2 SLURM tasks joined within --dist-timeout 3 s" in stderr
    assert time.monotonic() - started < 120
    assert not any(tmp_path.iterdir())  # nothing was written


FSDP_FLAGS = (*DDP_FLAGS, "--fsdp", "--fsdp-checkpoint", "sharded")


@pytest.fixture(scope="module")
def fsdp_restarted_run(tmp_path_factory):
    """The DDP run's flags with --fsdp and sharded checkpoints, a worker SIGKILLed after step 3, torchrun restarts."""
    output_dir = tmp_path_factory.mktemp("fsdp")
    completed = run_with_fault("kill-after-step:3:1", run_args(output_dir, 8, *FSDP_FLAGS), timeout=600,
                               torchrun=[*TWO_PROCESSES, "--max-restarts", "1"])
    return output_dir, completed


def test_fsdp_with_sharded_checkpoints_is_restarted_by_torchrun_and_matches_ddp(torchrun_run, fsdp_restarted_run):
    reference, _ = torchrun_run
    output_dir, restarted = fsdp_restarted_run
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert str(-signal.SIGKILL) in restarted.stderr or "SIGKILL" in restarted.stderr
    assert "step_00000002 (step 2)" in restarted.stdout  # resumed from the sharded checkpoint of step 2
    expected, actual = logged_losses(reference), logged_losses(output_dir)
    assert sorted(actual) == sorted(expected)
    for step, loss in expected.items():
        assert actual[step] == pytest.approx(loss, rel=1e-5), step
    newest = checkpoint.list_checkpoints(output_dir)[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["layout"] == "sharded" and manifest["world_size"] == 2
    assert sorted(manifest["sha256"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]


def test_a_sharded_checkpoint_loads_in_one_process_and_resumes_there_past_a_corrupt_shard(
        torchrun_run, fsdp_restarted_run, tmp_path, capsys):
    reference, _ = torchrun_run
    output_dir, restarted = fsdp_restarted_run
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    sharded = checkpoint.list_checkpoints(output_dir)[-1]
    expected = load_file(str(checkpoint.list_checkpoints(reference)[-1] / "model.safetensors"))
    from fastclip.eval.main import load_model_for_eval

    for model in (fastclip.create_model("fastclip-tiny", pretrained=str(sharded)),
                  load_model_for_eval(str(sharded), None, torch.device("cpu"), "fp32")):
        assert model.config.vision.image_size == 32  # the config recorded in the manifest
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    copy = tmp_path / "run"
    shutil.copytree(output_dir, copy)
    missing = copy / "checkpoints" / sharded.name
    with pytest.raises(CorruptCheckpointError, match="missing"):
        (missing / "__0_0.distcp").rename(missing / "moved")
        checkpoint.load_training_checkpoint(missing)
    (missing / "moved").rename(missing / "__0_0.distcp")
    shard = missing / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    # one process, --fsdp (nothing to shard: a note), the global batch of the two-process run
    assert main(run_args(copy, 16, "--resume", "latest", "--fsdp")) == 0
    out = capsys.readouterr().out
    assert "--fsdp on one process" in out and "is corrupt" in out and "NOT STEP-EXACT" in out
    assert "step_00000002 (step 2)" in out  # the previous checkpoint
    assert (copy / "checkpoints" / f"{sharded.name}.corrupt").is_dir()  # kept for inspection
    assert json.loads((copy / "results.json").read_text())["steps"] == STEPS
