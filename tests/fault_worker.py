"""``fastclip train`` with one fault injected: the test suite runs this file as a script (also under torchrun).

    FASTCLIP_TEST_FAULT=<kind>:<step>[:<rank>[:<n>]] python tests/fault_worker.py <fastclip train flags>

kinds (``step`` is a training step; the fault hits only ``rank``, default 0):

- ``kill-after-step``: SIGKILL right after training step ``step`` (before it is logged);
- ``stall-before-step``: sleep for an hour before step ``step`` (its peers must time out, not hang);
- ``kill-after-save``: SIGKILL right after checkpoint ``step`` is written and pruned;
- ``signal-after-step``: signal number ``n`` to this process right after training step ``step``;
  ``group-signal-after-step``: to its whole process group (DataLoader workers included), as a terminal's
  Ctrl-C or a cluster's preemption does (start the worker in a session of its own);
- SIGKILL during the write of checkpoint ``step``: ``kill-in-model`` (weights staged, nothing else),
  ``kill-in-state`` (half of state.pt written), ``kill-before-rename`` (staging complete, not yet
  renamed), ``kill-before-prune`` (renamed into place, older ones not yet pruned), ``kill-in-prune``
  (an old checkpoint hidden and half deleted);
- ``kill-at-line``: SIGKILL at the ``n``-th line executed by fastclip's checkpoint code (fastclip.io,
  fastclip.checkpoint_format, fastclip.train.checkpoint, fastclip.model.loading) from the save of
  checkpoint ``step`` on.

Only the first attempt of an elastic run (TORCHELASTIC_RESTART_COUNT unset or 0) is faulted. The kill
is a real crash: no cleanup, no flush.
"""
import io
import os
import signal
import sys
import time
from pathlib import Path


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install(kind: str, step: int, n: int) -> None:
    import torch

    import fastclip.checkpoint_format
    import fastclip.io
    import fastclip.model
    import fastclip.train.checkpoint as checkpoint
    import fastclip.train.loop as loop

    saving = {"step": None}
    save_checkpoint = loop.save_checkpoint

    def save(output_dir, at_step, *args, **kwargs):
        saving["step"] = at_step
        path = save_checkpoint(output_dir, at_step, *args, **kwargs)
        saving["step"] = None
        if kind == "kill-after-save" and at_step == step:
            die()
        return path

    loop.save_checkpoint = save

    def during(target_kind: str) -> bool:
        return kind == target_kind and saving["step"] == step

    if kind == "kill-after-save":
        pass  # done by save() above
    elif kind in ("signal-after-step", "group-signal-after-step"):
        train_step = loop.train_step

        def signalled_step(parts, state, *args, **kwargs):
            values = train_step(parts, state, *args, **kwargs)
            if state.step == step:
                if kind == "signal-after-step":
                    os.kill(os.getpid(), n)
                else:
                    os.killpg(os.getpgid(0), n)
            return values

        loop.train_step = signalled_step
    elif kind in ("kill-after-step", "stall-before-step"):
        train_step = loop.train_step

        def faulty_step(parts, state, *args, **kwargs):
            if kind == "stall-before-step" and state.step + 1 == step:
                time.sleep(3600)
            values = train_step(parts, state, *args, **kwargs)
            if kind == "kill-after-step" and state.step == step:
                die()
            return values

        loop.train_step = faulty_step
    elif kind == "kill-in-model":
        save_model = fastclip.model.save_model

        def model_then_die(*args, **kwargs):
            save_model(*args, **kwargs)
            if during("kill-in-model"):
                die()

        fastclip.model.save_model = model_then_die
    elif kind == "kill-in-state":
        torch_save = torch.save

        def half_then_die(obj, handle, *args, **kwargs):
            if not during("kill-in-state"):
                return torch_save(obj, handle, *args, **kwargs)
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            die()

        torch.save = half_then_die
    elif kind == "kill-before-rename":
        fsync_tree = fastclip.io._fsync_tree

        def fsync_then_die(root):
            fsync_tree(root)
            if during("kill-before-rename"):
                die()

        fastclip.io._fsync_tree = fsync_then_die
    elif kind == "kill-before-prune":
        prune = checkpoint.prune_lineage

        def die_before_prune(*args, **kwargs):
            if during("kill-before-prune"):
                die()
            return prune(*args, **kwargs)

        checkpoint.prune_lineage = die_before_prune
    elif kind == "kill-in-prune":
        rmtree = checkpoint.shutil.rmtree

        def delete_one_file_then_die(path, *args, **kwargs):
            if during("kill-in-prune"):
                next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
                die()
            return rmtree(path, *args, **kwargs)

        checkpoint.shutil.rmtree = delete_one_file_then_die
    elif kind == "kill-at-line":
        watched = {os.path.abspath(module.__file__) for module in (fastclip.io, fastclip.checkpoint_format, checkpoint,
                                                                   fastclip.model.loading)}
        executed = [0]

        def count_lines(frame, event, arg):
            if event == "line":
                executed[0] += 1
                if executed[0] >= n:
                    die()
            return count_lines

        def trace_calls(frame, event, arg):
            return count_lines if os.path.abspath(frame.f_code.co_filename) in watched else None

        def traced_save(output_dir, at_step, *args, **kwargs):
            if at_step >= step:
                sys.settrace(trace_calls)
            try:
                return save(output_dir, at_step, *args, **kwargs)
            finally:
                sys.settrace(None)

        loop.save_checkpoint = traced_save
    else:
        raise SystemExit(f"unknown fault kind {kind!r}")


if __name__ == "__main__":
    fault = os.environ.get("FASTCLIP_TEST_FAULT", "")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if fault and first_attempt:
        kind, step, rank, n = (fault.split(":") + ["0", "0"])[:4]
        if int(os.environ.get("RANK", "0")) == int(rank):
            install(kind, int(step), int(n))
    from fastclip.train.main import main

    sys.exit(main(sys.argv[1:]))
