"""``fastclip train``: build the model, data, loss and optimiser, resume, train, evaluate, report.

    fastclip train                                   # embedded shapes set, small CLIP, CPU, ~3 min
    torchrun --nproc-per-node 8 -m fastclip.train --train-data 'shards/{0000..0999}.tar' ...

From Python, without flags::

    from fastclip.train import TrainConfig, train
    results = train(TrainConfig(model="RN-Tiny", dataset_type="synthetic", train_num_samples=256, epochs=1))

The data flows CLI (args.py) -> :class:`TrainConfig` (config.py) -> parts (build.py) -> resume
(resume.py) -> loop (loop.py) -> loss -> backend; checkpoints go through checkpoint.py and fastclip.io.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import sys
import time
from pathlib import Path

import torch

from fastclip.distributed.comm import World
from fastclip.io import atomic_write_json
from fastclip.model.config import get_config
from fastclip.precision import check_precision_supported, default_precision
from fastclip.train.args import parse_args
from fastclip.train.build import TrainData, build_model, build_parts, build_train_data, seed_everything
from fastclip.train.config import TrainConfig
from fastclip.train.folder_zeroshot import evaluate_folder
from fastclip.train.fsdp import evaluation_model
from fastclip.train.launch_env import read_placement
from fastclip.train.loop import NonFiniteAbort, TrainState, run_epochs
from fastclip.train.metrics import MetricsLogger, plain_progress_interval
from fastclip.train.optim import LearningRateSchedule
from fastclip.train.preemption import INTERRUPTED_EXIT, PREEMPTED_EXIT, Preempted, StopRequest, resume_command
from fastclip.train.process_group import (RendezvousError, barrier, decide_on_main, gather_objects, init_distributed,
                                          is_peer_failure, say, shutdown_distributed)
from fastclip.train.profiling import StepProfiler
from fastclip.train.resume import planned_total_steps, resume_if_asked
from fastclip.train.run_dir import RESULTS_FILE, RunPlan, prepare_output, remove_created_folders
from fastclip.train.run_lock import release_run_folders
from fastclip.train.run_log import console_log, write_params

logger = logging.getLogger("fastclip.train")


def _prepare_output(config: TrainConfig, ctx: World):
    """Rank 0 checks the output folder and picks the checkpoint (run_dir.py); every rank gets the plan."""
    holder = {}

    def decide() -> RunPlan:
        plan, holder["loaded"] = prepare_output(config)
        return plan

    plan = decide_on_main(ctx, decide)
    for note in plan.notes:
        say(ctx, note)
    return plan, holder.get("loaded")


def run(config: TrainConfig, ctx: World, where: dict | None = None) -> dict:
    """Train as ``config`` says; returns the results dict (rank 0 also writes results.json).

    SIGTERM/SIGUSR1 stop the run after the step in flight with a checkpoint: :class:`Preempted` is raised.
    ``where`` (optional) receives ``output_dir`` as soon as it is decided (for the Ctrl-C message).
    """
    with StopRequest() as stop, contextlib.ExitStack() as cleanup:
        return _run(config, ctx, stop, {} if where is None else where, cleanup)


def _run(config: TrainConfig, ctx: World, stop: StopRequest, where: dict,
         cleanup: contextlib.ExitStack) -> dict:
    wall_start = time.perf_counter()
    where.update(rank=ctx.rank, processes=ctx.size)
    log = cleanup.enter_context(console_log(ctx.is_main or (config.log_local and ctx.local_rank == 0)))
    precision_note = ""
    if config.precision is None:  # no --precision: what suits the device, said in the header
        precision, why = default_precision(ctx.device)
        config, precision_note = config.replace(precision=precision), f" ({why})"
    check_precision_supported(config.precision, ctx.device)
    get_config(config.model)  # an unknown --model: the list of names, before anything is written
    plan, loaded = _prepare_output(config, ctx)  # before anything slow: a refused folder costs nothing
    config = config.replace(output_dir=plan.output_dir, logs=None, name=None)
    where["output_dir"] = config.output_dir
    writing = []  # set once every check has passed; before that a refusal removes the folders this run created
    if ctx.is_main:
        cleanup.callback(lambda: writing or remove_created_folders(plan.created))
    seed_everything(config.seed)  # identical initial weights on every rank
    model = build_model(config, ctx)
    data = build_train_data(config, ctx, model.config.vision.image_size, model.context_length)
    batches = data.batches
    seed_everything(config.seed + ctx.rank)  # different dropout masks per rank
    parts, optimizer_name = build_parts(config, ctx, model, lineage={"run_id": plan.run_id, "parent": plan.parent})
    state = resume_if_asked(config, ctx, parts, batches, plan, loaded)
    total_steps = planned_total_steps(config, batches, state)
    parts.schedule = _schedule(config, batches.num_batches, total_steps)
    del loaded  # rank 0's copy of the optimiser state
    say(ctx, f"model {config.model} ({_parameter_summary(model)}), {optimizer_name}, "
             f"precision {config.precision}{precision_note}, {ctx.size} process(es) on {ctx.device}, "
             f"{_schedule_summary(config, batches, state, total_steps)}, global batch {config.batch_size * ctx.size} "
             f"({config.batch_size} per process), output {config.output_dir}")
    for warning in _schedule_warnings(config, total_steps):
        say(ctx, warning)
    plain_every = (plain_progress_interval(total_steps) if config.progress_every_n_steps is None
                   else config.progress_every_n_steps)
    bar = not config.no_progress and sys.stderr.isatty()
    # Every check passed: from here on the run folder is created and written.
    writing.append(True)
    log.attach(Path(config.output_dir) / ("out.log" if ctx.is_main else f"out-{ctx.rank}.log"))
    if ctx.is_main:
        write_params(Path(config.output_dir), config, resumed_from=plan.resume_path)
    wandb = {"project": config.wandb_project_name, "notes": config.wandb_notes, "id": plan.run_id,
             "name": Path(config.output_dir).name, "config": config.to_dict()}
    metrics = MetricsLogger(config.output_dir, is_main=ctx.is_main, report_to=config.report_to,
                            total_steps=total_steps, initial_step=state.step, progress=bar,
                            plain_every=plain_every if not (bar and sys.stdout.isatty()) else 0,  # pipes, logs
                            say=lambda message: say(ctx, message), wandb=wandb)
    # the model itself; under --fsdp its weights gathered into a whole copy on rank 0 (collective)
    model_for_eval = functools.partial(evaluation_model, parts, ctx, config)

    def evaluate() -> dict:
        return _evaluate_embedded(config, ctx, model_for_eval(), data)

    def evaluate_folder_now() -> dict:
        return evaluate_folder(config, ctx, model_for_eval(), data.eval_transform, data.tokenizer, metrics.announce)

    def evaluate_val_now() -> dict:
        return _evaluate_val_data(config, ctx, model_for_eval(), data)

    on_epoch_end = None
    periodic_val = bool(config.val_data and not config.embedded and config.val_frequency)
    if ((data.embedded_root is not None or config.imagenet_val) and config.zeroshot_frequency) or periodic_val:
        def on_epoch_end(epoch: int) -> None:
            if epoch >= config.epochs or state.step >= total_steps:
                return  # the end of training evaluates
            if periodic_val and epoch % config.val_frequency == 0:
                metrics.log(state.step, evaluate_val_now(), kind="val")
            if config.zeroshot_frequency and epoch % config.zeroshot_frequency == 0:
                results = {}
                if data.embedded_root is not None:
                    results = {k: v for k, v in evaluate().items() if "ensemble_top1" in k}
                    if results:
                        metrics.announce(f"zero-shot after epoch {epoch} (step {state.step}): ensemble top-1 " +
                                         ", ".join(f"{key.split('/')[0]} {100 * value:.1f}%"
                                                   for key, value in results.items()))
                if config.imagenet_val:
                    results.update(evaluate_folder_now())
                if results:
                    metrics.log(state.step, results, kind="zeroshot")
    profiler = StepProfiler(config.profile, config.output_dir, ctx.rank) if config.profile else None
    try:
        timing = run_epochs(parts, state, batches, config, total_steps=total_steps, metrics=metrics,
                            profiler=profiler, on_epoch_end=on_epoch_end, stop=stop)
    finally:
        if profiler is not None:
            profiler.close()
        metrics.close()
    final_checkpoint = _newest_checkpoint(config.output_dir)
    if timing["stopped_by"]:
        raise Preempted(timing["stopped_by"], state.step, str(final_checkpoint), config.output_dir)
    evaluation = evaluate() if data.embedded_root is not None else {}
    if config.imagenet_val:
        evaluation.update(evaluate_folder_now())
    if periodic_val:
        evaluation.update(evaluate_val_now())
    results = {
        # the embedded set's seen split, else the --imagenet-val folder
        "zeroshot_top1": evaluation.get("val_seen/ensemble_top1", evaluation.get("imagenet-val/top1")),
        "zeroshot_top5": evaluation.get("val_seen/ensemble_top5", evaluation.get("imagenet-val/top5")),
        "steps": state.step,
        "samples_per_second": timing["samples_per_second"],
        "samples_seen": state.samples_seen,
        "nonfinite_steps": state.nonfinite_total,
        "skipped_images": sum(gather_objects(ctx, state.skipped_images)),
        "skipped_rows": len(getattr(batches.dataset, "skipped_rows", ())),
        "world_size": ctx.size,
        "precision": config.precision,
        "model": config.model,
        "train_seconds": timing["train_seconds"],
        "wall_seconds": time.perf_counter() - wall_start,
        "evaluation": evaluation,
    }
    if ctx.is_main:
        atomic_write_json(Path(config.output_dir) / RESULTS_FILE, results)  # a NaN (no step trained) becomes null
        if data.embedded_root is not None:
            from fastclip.eval.embedded import format_report

            print(format_report(evaluation), flush=True)
        speed = (f"{timing['samples_per_second']:.0f} samples/s in training" if timing["trained_samples"]
                 else "no step left to train")
        saved = f"final checkpoint {final_checkpoint}" if final_checkpoint else "no checkpoint saved (--save-frequency 0)"
        print(f"{state.step} steps, {speed}, {results['wall_seconds']:.0f} s in all; results in "
              f"{Path(config.output_dir) / RESULTS_FILE}; {saved}", flush=True)
    return results


def _newest_checkpoint(output_dir: str) -> Path | None:
    from fastclip.train.checkpoint import list_checkpoints

    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _schedule(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> LearningRateSchedule:
    """open_clip's schedule of ``--lr-scheduler`` (``--skip-scheduler``: --lr at every step, no warm-up)."""
    if config.skip_scheduler:
        return LearningRateSchedule(config.lr, 0, total_steps, "const")
    cooldown = (config.epochs_cooldown or 0) * steps_per_epoch
    return LearningRateSchedule(config.lr, config.warmup, total_steps, config.lr_scheduler, cooldown_steps=cooldown,
                                cooldown_power=config.lr_cooldown_power, cooldown_end_lr=config.lr_cooldown_end)


def _schedule_warnings(config: TrainConfig, total_steps: int) -> list[str]:
    """Said before the first step: settings under which the run cannot reach its learning rate."""
    if config.skip_scheduler or not config.warmup or config.warmup <= total_steps:
        return []
    reached = config.lr * total_steps / config.warmup
    return [f"WARNING: --warmup {config.warmup} is longer than the whole run ({total_steps} steps): the learning rate "
            f"only climbs to {reached:.3g} of --lr {config.lr:g} and never decays, so the loss may barely move. Set "
            f"--warmup to a few percent of the run (e.g. --warmup {max(1, total_steps // 20)})"]


def _parameter_summary(model: torch.nn.Module) -> str:
    """``12.4 M parameters`` or, with locked towers, ``12.4 M parameters, 3.1 M trainable``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = f"{total / 1e6:.1f} M parameters"
    return text if trainable == total else f"{text}, {trainable / 1e6:.1f} M trainable"


def _schedule_summary(config: TrainConfig, batches, state: TrainState, total_steps: int) -> str:
    """``375 steps/epoch x 3 epochs``, and how many steps this run takes when --max-steps or a resume changes it."""
    text = f"{batches.num_batches} steps/epoch x {config.epochs} epochs"
    if total_steps != batches.num_batches * config.epochs or state.step:
        reason = " (--max-steps)" if config.max_steps and total_steps == config.max_steps else ""
        text += f", {total_steps} steps in all{reason}"
        if state.step:
            text += f" from step {state.step}"
    return text


def _evaluate_embedded(config: TrainConfig, ctx: World, model: torch.nn.Module, data: TrainData) -> dict:
    """Zero-shot/retrieval report on rank 0 (the others wait); {} elsewhere."""
    results = {}
    if ctx.is_main:
        from fastclip.eval.embedded import evaluate_embedded

        results = evaluate_embedded(model, data.embedded_root, transform=data.eval_transform,
                                    tokenizer=data.tokenizer, device=ctx.device, precision=config.precision,
                                    workers=min(config.workers, 2))
        model.train()
    barrier(ctx)
    return results


def _evaluate_val_data(config: TrainConfig, ctx: World, model: torch.nn.Module, data: TrainData) -> dict:
    """Image<->text recall@1/5/10 on the --val-data pairs (rank 0; identical captions count as one)."""
    results = {}
    if ctx.is_main:
        from fastclip.eval.features import encode_csv_images
        from fastclip.eval.retrieval import MATCH_RULE, caption_retrieval

        dataset, image_features = encode_csv_images(
            model, config.val_data, transform=data.eval_transform, tokenizer=data.tokenizer, device=ctx.device,
            precision=config.precision, img_key=config.csv_img_key, caption_key=config.csv_caption_key,
            separator=config.csv_separator, workers=min(config.workers, 2), limit=config.val_num_samples)
        recalls = caption_retrieval(model, image_features, dataset.captions, tokenizer=data.tokenizer,
                                    device=ctx.device, precision=config.precision)
        results = {f"val/{key}": value for key, value in recalls.items()}
        print("validation retrieval: " + ", ".join(f"{key} {100 * value:.1f}%" for key, value in recalls.items())
              + f" ({MATCH_RULE})", flush=True)
        model.train()
    barrier(ctx)
    return results


def _user_message(error: BaseException) -> str:
    """The error's text, without the traceback a DataLoader worker wraps around an exception it re-raises."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        lines = text.rstrip().splitlines()
        for index in range(len(lines) - 1, 0, -1):
            head, _, rest = lines[index].partition(": ")
            if rest and not lines[index].startswith(" ") and head.replace(".", "").replace("_", "").isalnum():
                return " ".join([rest, *lines[index + 1:]]) + " (raised in a DataLoader worker)"
    return text


#: OSErrors that the machine causes, not fastclip: disk full, quota, read-only file system, permissions
_ENVIRONMENT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def train(config: TrainConfig) -> dict:
    """Train as ``config`` says (under torchrun: on every rank) and return the results dict.

    Starts the process group when torchrun's environment asks for one and leaves it running (a second
    call reuses it; :func:`~fastclip.train.process_group.shutdown_distributed` ends it). Errors are raised:
    ValueError for what the user can fix, :class:`~fastclip.train.loop.NonFiniteAbort` for divergence,
    :class:`~fastclip.train.preemption.Preempted` when SIGTERM/SIGUSR1 stopped the run with a checkpoint.
    """
    return _train(config, {})


def _train(config: TrainConfig, where: dict) -> dict:
    try:
        return run(config, init_distributed(_device(config), config.dist_backend, config.dist_timeout), where)
    finally:
        release_run_folders()  # the lock on --output-dir (run_lock.py)


def _device(config: TrainConfig) -> str | None:
    """``--device``, or cuda:0 in every process with ``--no-set-device-rank`` (one visible GPU per process)."""
    if config.no_set_device_rank and config.device in (None, "cuda") and torch.cuda.is_available():
        return "cuda:0"
    return config.device


def _interrupted_message(argv: list[str], where: dict) -> str:
    """One line for Ctrl-C: where the run stands and how to go on."""
    output_dir = where.get("output_dir")
    if output_dir is None:
        return "fastclip train: interrupted (Ctrl-C) before the run folder was chosen; nothing was written"
    from fastclip.train.checkpoint import list_checkpoints

    found = list_checkpoints(output_dir)
    if not found:
        return f"fastclip train: interrupted (Ctrl-C); no checkpoint saved yet in {output_dir}"
    return (f"fastclip train: interrupted (Ctrl-C); newest checkpoint {found[-1]}; resume with: "
            f"{resume_command(argv, output_dir, where.get('processes', 1))}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastclip train`` / ``python -m fastclip.train``; returns the exit status.

    0: done. 2: a user error (flags, paths, data, checkpoints) or a full/read-only disk, with the fix.
    3: training diverged (too many non-finite steps). 4: another process stalled or died
    (``--dist-timeout``). 75: stopped by SIGTERM/SIGUSR1 after writing a checkpoint (requeue the job with
    ``--resume latest``). 130: stopped by Ctrl-C. A traceback means a bug in fastclip.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_args(argv)
    except ValueError as error:
        print(f"fastclip train: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if config.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    where = {}
    try:
        _train(config, where)
        return 0
    except Preempted as stopped:
        if where.get("rank", 0) == 0:
            command = resume_command(argv, stopped.output_dir, where.get("processes", 1))
            print(f"fastclip train: stopped by {stopped.signal_name} after step {stopped.step}; checkpoint "
                  f"{stopped.checkpoint}; exit status {PREEMPTED_EXIT}. Resume with: {command}", file=sys.stderr,
                  flush=True)
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        if where.get("rank", 0) == 0:
            print(_interrupted_message(argv, where), file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    except NonFiniteAbort as error:
        print(f"fastclip train: aborted: {error}", file=sys.stderr)
        return 3
    except (ValueError, ImportError) as error:  # user-fixable: say what to change
        print(f"fastclip train: {_user_message(error)}", file=sys.stderr)
        return 2
    except RendezvousError as error:
        print(f"fastclip train: the processes did not meet: {error}", file=sys.stderr)
        return 4
    except RuntimeError as error:
        if not is_peer_failure(error):
            raise
        print(f"fastclip train: rank {read_placement().rank}: a collective operation failed because another "
              f"process stalled or died ({str(error).splitlines()[0]}). Collectives wait at most --dist-timeout "
              f"{config.dist_timeout:g} s; the other processes' logs say which one failed first. If a step, a "
              "checkpoint write or the evaluation on rank 0 legitimately takes longer, raise --dist-timeout.",
              file=sys.stderr)
        return 4
    except OSError as error:
        if error.errno not in _ENVIRONMENT_ERRORS:
            raise
        print(f"fastclip train: {error.strerror}: {error.filename or error}; free space or choose another "
              "--output-dir (checkpoints already saved are untouched)", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
