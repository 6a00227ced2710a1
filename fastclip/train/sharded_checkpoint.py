"""Checkpoints of ``--fsdp`` runs, and resuming any run from a sharded checkpoint.

``--fsdp-checkpoint full`` gathers the weights and the optimizer state to rank 0, which writes the folder of
a DDP run (``fastclip.train.checkpoint``): ``model.safetensors``, ``state.pt`` with the optimizer state in
``torch.optim``'s own form (keyed by parameter position), the manifest. A DDP run resumes it, and so does
an FSDP run of any size.

``--fsdp-checkpoint sharded`` has every rank write its shards with torch.distributed.checkpoint (DCP) into
one staging folder; once every rank is done, rank 0 adds ``state.pt`` (schedule, data position, every
rank's RNG) and the manifest (the model config and the SHA-256 of every file), then renames the folder into
place: the guarantees of docs/design.md section 6 (whole or absent, verified on load, lineage and
``--keep-last``) hold as for full checkpoints. DCP reshards on load, so a sharded checkpoint resumes on
another process count (NOT STEP-EXACT, as any change of world size), in one process without FSDP, and its
weights load through ``create_model(pretrained=<folder>)`` (``fastclip.checkpoint_format``).

The folder must be on a file system every rank sees (one folder, written by all).
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastclip.checkpoint_format import MODEL_FILE, SHARDED_LAYOUT, dcp_in_one_process, read_weights
from fastclip.io import publish_dir, staging_dir
from fastclip.train.checkpoint import (LoadedCheckpoint, describe_mismatch, new_checkpoint_path, prune_lineage,
                                       save_checkpoint, write_state_and_manifest)
from fastclip.train.fsdp import full_model_state, is_sharded
from fastclip.train.process_group import all_or_none, decide_on_main


@dataclass
class GatheredModel:
    """Whole weights gathered from the shards, with the config: what ``save_model`` needs of a model."""

    weights: dict
    config: object

    def state_dict(self) -> dict:
        return self.weights


def _positions(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The name of each optimised parameter, in the order ``optimizer.state_dict()`` numbers them."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def optimizer_state_by_position(optimizer: torch.optim.Optimizer, model: nn.Module, by_name: dict) -> dict:
    """DCP's whole optimizer state (keyed by parameter name) -> ``optimizer.state_dict()``'s form (by position)."""
    position = {name: index for index, name in enumerate(_positions(optimizer, model))}
    return {"state": {position[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**group, "params": [position[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module, by_position: dict) -> dict:
    """The inverse of :func:`optimizer_state_by_position`, for the current optimizer's parameters."""
    names = _positions(optimizer, model)
    groups = by_position["param_groups"]
    if sum(len(group["params"]) for group in groups) != len(names):
        raise ValueError(f"it optimises {sum(len(group['params']) for group in groups)} parameters, this run "
                         f"{len(names)}")
    return {"state": {names[index]: value for index, value in by_position["state"].items()},
            "param_groups": [{**group, "params": [names[index] for index in group["params"]]} for group in groups]}


def save_fsdp_checkpoint(parts, state, config) -> None:
    """Write checkpoint ``state.step`` in the run's ``--fsdp-checkpoint`` layout. Collective: every rank calls it,
    and every rank raises if it fails anywhere (nothing is then left but a hidden staging folder)."""
    if parts.checkpoint_layout == SHARDED_LAYOUT:
        _save_sharded(parts, state, config)
    else:
        _save_gathered(parts, state, config)


def _save_gathered(parts, state, config) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from fastclip.train.loop import checkpoint_details, checkpoint_state

    model, ctx = parts.unwrapped, parts.ctx
    weights = full_model_state(model)
    optimizer = get_optimizer_state_dict(model, parts.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    payload = checkpoint_state(parts, state, config.batch_size)

    def write() -> None:
        if ctx.is_main:
            payload["optimizer"] = optimizer_state_by_position(parts.optimizer, model, optimizer)
            save_checkpoint(config.output_dir, state.step, GatheredModel(weights, model.config), payload,
                            model_name=config.model, run_id=parts.lineage.get("run_id"),
                            parent=parts.lineage.get("parent"), details=checkpoint_details(parts, config),
                            keep_last=config.keep_last)

    all_or_none(ctx, write)


def _save_sharded(parts, state, config) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from fastclip.train.loop import checkpoint_details, checkpoint_state

    model, ctx = parts.unwrapped, parts.ctx
    payload = {**checkpoint_state(parts, state, config.batch_size), "optimizer": {}}  # the optimizer is in the shards

    def stage() -> tuple[str, str]:
        final = new_checkpoint_path(config.output_dir, state.step)
        return str(final), str(staging_dir(final))

    final, staging = map(Path, decide_on_main(ctx, stage))  # one folder, made by rank 0, written by all
    try:
        shards = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, parts.optimizer)}
        with dcp_in_one_process() if not ctx.distributed else contextlib.nullcontext():
            dcp.save(shards, checkpoint_id=str(staging), no_dist=not ctx.distributed)  # fails on all ranks or none

        def publish() -> None:
            if ctx.is_main:
                write_state_and_manifest(staging, payload, {
                    "layout": SHARDED_LAYOUT, "step": state.step, "model": config.model,
                    "config": model.config.to_dict(), "run_id": parts.lineage.get("run_id"),
                    "parent": parts.lineage.get("parent"), **checkpoint_details(parts, config)})
                publish_dir(staging, final)
                if config.keep_last > 0:
                    prune_lineage(config.output_dir, parts.lineage.get("run_id"), config.keep_last, keep=final)

        all_or_none(ctx, publish)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def restore_model_and_optimizer(parts, found: LoadedCheckpoint) -> None:
    """Load checkpoint ``found`` into a sharded model, or a sharded checkpoint into any model (the other case,
    full into unsharded, is ``resume._restore``'s). ValueError when it does not fit this run."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    model, optimizer = parts.unwrapped, parts.optimizer
    if found.sharded:
        _load_shards(model, optimizer, found.path, collective=is_sharded(model))
        return
    from safetensors.torch import load_file

    weights = read_weights(found.path / MODEL_FILE, lambda path: load_file(str(path), device="cpu"))
    mismatch = describe_mismatch(weights, model)
    if mismatch:
        raise ValueError(f"the weights of {found.path} do not fit this model: {mismatch}. Resume with the "
                         "--model and --force-image-size of the run that wrote it")
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=whole)
    try:
        by_name = optimizer_state_by_name(optimizer, model, found.state["optimizer"])
        set_optimizer_state_dict(model, optimizer, by_name, options=whole)
    except (ValueError, KeyError, IndexError, RuntimeError) as error:
        raise ValueError(f"the optimiser state in {found.path} does not fit this run ({error}); resume with the "
                         "flags of the run that wrote it") from None


def _load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, *, collective: bool) -> None:
    """DCP-load the model and optimizer shards of ``path`` into ``model``/``optimizer`` (resharding as needed).
    ``collective``: the ranks load together (a sharded model); otherwise each process reads what it needs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        with contextlib.nullcontext() if collective else dcp_in_one_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=not collective)
    except Exception as error:  # DCP's CheckpointException wraps missing keys and shape mismatches
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"the sharded checkpoint {path} does not fit this run ({message[:500]}); resume with "
                         "the --model, --force-image-size and locks of the run that wrote it") from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
