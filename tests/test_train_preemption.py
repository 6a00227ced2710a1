"""Preemption and interruption of ``fastclip train`` (single process; the torchrun case is in
tests/test_train_distributed.py, beside the uninterrupted two-process run it is compared with).

SIGTERM (or SIGUSR1) sent mid-epoch to the whole process group, DataLoader workers included, as a
cluster does: the step in flight finishes, a checkpoint of it is written, the resume command is printed,
the exit status is 75, and running that command gives the uninterrupted run's losses bitwise. Ctrl-C:
one line with the resume command and exit status 130, no traceback from the trainer or its workers.
"""
import shlex
import signal

import pytest

from fastclip.train import checkpoint
from fastclip.train.main import main
from fastclip.train.preemption import INTERRUPTED_EXIT, PREEMPTED_EXIT, resume_command
from tests.train_utils import logged_losses, run_with_fault, synthetic_run_args


def run_args(output_dir):
    """6 steps in one epoch, checkpoints every 2 steps (the newest two kept), two DataLoader workers."""
    return synthetic_run_args(output_dir, "--workers", "2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    assert main(run_args(output_dir)) == 0
    return output_dir


def test_sigterm_mid_epoch_saves_the_step_reached_and_the_printed_command_resumes_bitwise(uninterrupted, tmp_path):
    signum = signal.SIGTERM  # SIGUSR1 is tested under torchrun (tests/test_train_distributed.py)
    stopped = run_with_fault(f"group-signal-after-step:3:0:{int(signum)}", run_args(tmp_path), own_session=True)
    assert stopped.returncode == PREEMPTED_EXIT, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert [path.name for path in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert max(logged_losses(tmp_path)) == 3  # the step in flight finished, and no step after it began
    message = stopped.stderr.strip().splitlines()[-1]
    assert f"stopped by {signum.name} after step 3" in message and str(tmp_path / "checkpoints" / "step_00000003") \
        in message, message
    command = shlex.split(message.split("Resume with: ", 1)[1])
    assert command[:2] == ["fastclip", "train"] and command[-2:] == ["--resume", "latest"]
    assert main(command[2:]) == 0
    assert logged_losses(tmp_path) == logged_losses(uninterrupted)  # bitwise, every step


def test_ctrl_c_prints_one_line_with_the_resume_command_and_no_traceback(tmp_path):
    interrupted = run_with_fault(f"group-signal-after-step:3:0:{int(signal.SIGINT)}",
                                 run_args(tmp_path) + ["--max-steps", "4"], own_session=True)
    assert interrupted.returncode == INTERRUPTED_EXIT, interrupted.stderr[-3000:]
    assert "Traceback" not in interrupted.stderr and "KeyboardInterrupt" not in interrupted.stderr, \
        interrupted.stderr[-3000:]
    lines = [line for line in interrupted.stderr.splitlines() if line.startswith("fastclip train:")]
    assert len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0], interrupted.stderr[-3000:]
    assert "step_00000002" in lines[0] and lines[0].endswith("--resume latest")


def test_the_resume_command_keeps_the_flags_and_names_the_run_folder():
    assert resume_command(["--epochs", "2", "--resume", "x"], "runs/t") == \
        "fastclip train --epochs 2 --output-dir runs/t --resume latest"
    assert resume_command(["--logs", "L", "--resume=latest"], "L/2026-x") == \
        "fastclip train --logs L --name 2026-x --resume latest"
    assert resume_command(["--logs", "L", "--name", "n"], "L/n") == "fastclip train --logs L --name n --resume latest"
