"""Fault injection: a run SIGKILLed at any moment of a checkpoint write, then resumed with ``--resume latest``,
ends with the per-step losses and the weights of a run that was never interrupted, and leaves no debris.

Each faulty run is tests/fault_worker.py in a fresh process (a real SIGKILL: no cleanup, no flush).
The torchrun faults (a worker killed under an elastic restart, a stalled rank) are in
tests/test_train_distributed.py, next to the uninterrupted two-process run they are compared with.
"""
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from fastclip.train import checkpoint
from fastclip.train.main import main
from tests.train_utils import logged_losses, run_with_fault, synthetic_run_args

# fault -> checkpoints on disk right after the kill. The run trains 4 steps, saves steps 2 and 4 and keeps
# the newest one.
NAMED_FAULTS = {
    "kill-in-state:4": ["step_00000002"],        # state.pt half written in the hidden staging folder
    "kill-before-rename:4": ["step_00000002"],   # staging complete and fsync'ed, not renamed
    "kill-before-prune:4": ["step_00000002", "step_00000004"],  # renamed into place, step 2 not pruned yet
    "kill-in-prune:4": ["step_00000004"],        # step 2 hidden, then half deleted
}
LINES_PER_SAVE = 430  # lines of fastclip.io / checkpoint / save_model one save executes (measured: 434-528)


def run_args(output_dir, *extra):
    return synthetic_run_args(output_dir, "--max-steps", "4", "--keep-last", "1", *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    assert main(run_args(output_dir)) == 0
    return output_dir


def _final_weights(output_dir):
    return load_file(str(checkpoint.list_checkpoints(output_dir)[-1] / checkpoint.MODEL_FILE))


def _assert_resumes_like_the_uninterrupted_run(tmp_path, uninterrupted):
    assert main(run_args(tmp_path, "--resume", "latest")) == 0
    assert logged_losses(tmp_path) == logged_losses(uninterrupted)  # bitwise, every step
    expected, resumed = _final_weights(uninterrupted), _final_weights(tmp_path)
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    left = sorted(entry.name for entry in (tmp_path / "checkpoints").iterdir())
    assert left[-1] == "step_00000004" and not [name for name in left if not name.startswith("step_")]  # no debris
    for path in checkpoint.list_checkpoints(tmp_path):
        checkpoint.load_training_checkpoint(path)  # every checkpoint left verifies


@pytest.mark.parametrize("fault", sorted(NAMED_FAULTS))
def test_sigkill_at_each_stage_of_a_checkpoint_write_then_resume(fault, uninterrupted, tmp_path):
    killed = run_with_fault(fault, run_args(tmp_path))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [path.name for path in checkpoint.list_checkpoints(tmp_path)] == NAMED_FAULTS[fault]
    for path in checkpoint.list_checkpoints(tmp_path):
        checkpoint.load_training_checkpoint(path)  # whatever was renamed into place is whole
    _assert_resumes_like_the_uninterrupted_run(tmp_path, uninterrupted)


def test_sigkill_at_a_random_line_of_a_checkpoint_write_then_resume(uninterrupted, tmp_path):
    line = random.randrange(1, LINES_PER_SAVE)
    killed = run_with_fault(f"kill-at-line:4:0:{line}", run_args(tmp_path))
    assert killed.returncode == -signal.SIGKILL, f"line {line}: {killed.stderr[-3000:]}"
    _assert_resumes_like_the_uninterrupted_run(tmp_path, uninterrupted)
