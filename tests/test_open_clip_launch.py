"""An open_clip user's launch script: every flag of open_clip 3.3's ``open_clip_train.params`` is accepted with
open_clip's meaning or refused with exit 2 and the reason; whole flag names; open_clip's run layout (--logs/--name),
schedules and transforms checked against open_clip's own; wandb offline; eval takes the run folder."""
import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from fastclip.cli import FlagError
from fastclip.train.args import build_parser, parse_args
from fastclip.train.main import main
from fastclip.train.open_clip_flags import REFUSED
from tests.data_utils import write_pairs

DOC = Path(__file__).resolve().parent.parent / "docs" / "open_clip_flags.md"


def open_clip_flags() -> list[argparse.Action]:
    """The actions of open_clip_train.params' parser (it builds the parser inside parse_args)."""
    params = pytest.importorskip("open_clip_train.params")
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        return original(self, [], namespace)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        params.parse_args([])
    return [action for action in captured["parser"]._actions if action.option_strings
            and not isinstance(action, argparse._HelpAction)]


def sample_values(action: argparse.Action) -> list[list[str]]:
    """Command-line values open_clip accepts for ``action``: each choice, its default, or one of its type."""
    if action.nargs == 0:
        return [[]]
    if action.choices:
        return [[choice] for choice in action.choices]
    if action.nargs == "*":  # --aug-cfg
        return [["scale=(0.5, 1.0)"]]
    if action.default not in (None, "", {}):
        return [[str(action.default)]]
    return [[{int: "3", float: "0.5"}.get(action.type, "x")]]


def test_every_open_clip_flag_is_accepted_or_refused_with_a_reason():
    parser = build_parser()
    accepted, refused = [], []
    for action in open_clip_flags():
        flag = action.option_strings[0]
        for values in sample_values(action):
            try:
                parser.parse_args([flag, *values])
                accepted.append(flag)
            except FlagError as error:
                assert flag in REFUSED, f"open_clip's {flag} {values} is refused: {error}"
                assert "does not apply" in str(error) and "unknown flag" not in str(error)
                refused.append(flag)
    assert sorted(set(refused)) == sorted(REFUSED)  # every refusal is an open_clip flag, and is exercised
    assert not set(accepted) & set(REFUSED)


def test_the_flag_table_lists_every_open_clip_flag_with_fastclips_answer_and_the_counts():
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| (implemented|refused) \|", text, re.MULTILINE))
    flags = [action.option_strings[0] for action in open_clip_flags()]
    assert sorted(rows) == sorted(flags)
    assert {flag for flag, status in rows.items() if status == "refused"} == set(REFUSED)
    total, refused = len(flags), len(REFUSED)
    assert f"{total} open_clip flags: {total - refused} implemented, {refused} refused with a reason" in text


@pytest.mark.parametrize("argv, expected", [
    (["--batch", "8"], "unknown flag --batch; did you mean --batch-size?"),  # argparse would read --batch-size
    (["--epoch", "2"], "did you mean --epochs"),
    (["--lgos", "x"], "did you mean --logs"),
    (["--horovod"], "--horovod (an open_clip flag) does not apply: Horovod"),
    (["--opt", "timm/lamb"], "timm optimisers"),
    (["--output-dir", "a", "--logs", "b"], "--output-dir and --logs/--name"),
    (["--lr-scheduler", "const-cooldown"], "needs --epochs-cooldown"),
    (["--dist-url", "tcp://h:1"], "torchrun"),
    (["--delete-previous-checkpoint", "--keep-last", "3"], "--keep-last 3"),
    (["--aug-cfg", "use_timm=True"], "timm augmentations"),
])
def test_bad_flags_get_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert expected in error and "usage:" not in error and len(error.strip().splitlines()) == 1, error


def test_an_eval_typo_is_named_before_a_missing_required_flag(capsys):
    from fastclip.eval.main import main as evaluate

    assert evaluate(["--tas", "zeroshot", "--checkpoint", "x"]) == 2
    error = capsys.readouterr().err
    assert "unknown flag --tas; did you mean --task" in error and len(error.strip().splitlines()) == 1


def test_force_context_length_and_quick_gelu_reach_the_model():
    from fastclip.train.build import build_model
    from fastclip.distributed.comm import World

    config = parse_args(["--dataset-type", "synthetic", "--precision", "fp32", "--force-context-length", "16",
                         "--force-quick-gelu", "--force-image-size", "32"])
    model = build_model(config, World())
    assert model.context_length == 16 and model.config.quick_gelu


def test_counts_are_singular_or_plural():
    from fastclip.eval.zeroshot import format_folder_result

    line = format_folder_result("d", {"top1": 0.5, "top5": 1.0, "images": 1, "classes": 3, "templates": 1})
    assert line.endswith("(1 image, 3 classes, 1 template)")


def test_open_clip_aliases_and_implied_settings():
    config = parse_args(["--precision", "amp_bfloat16", "--delete-previous-checkpoint", "--force-quick-gelu",
                         "--force-image-size", "32", "32", "--dataset-type", "synthetic"])
    assert (config.precision, config.keep_last, config.model, config.force_image_size) == \
        ("amp_bfloat16", 1, "fastclip-tiny-quickgelu", 32)


def _open_clip_schedule(kind, optimizer, base_lr, warmup, total, cooldown):
    from open_clip_train import scheduler

    if kind == "const-cooldown":
        return scheduler.const_lr_cooldown(optimizer, base_lr, warmup, total, cooldown, 2.0, 1e-5)
    return {"cosine": scheduler.cosine_lr, "const": scheduler.const_lr}[kind](optimizer, base_lr, warmup, total)


@pytest.mark.parametrize("kind", ["cosine", "const", "const-cooldown"])
def test_schedules_equal_open_clips(kind):
    pytest.importorskip("open_clip_train")
    from fastclip.train.optim import LearningRateSchedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    expected = _open_clip_schedule(kind, optimizer, 3e-4, 7, 37, 11)
    ours = LearningRateSchedule(3e-4, 7, 37, kind, cooldown_steps=11, cooldown_power=2.0, cooldown_end_lr=1e-5)
    for step in range(37):
        assert ours.lr_at(step) == pytest.approx(expected(step), rel=1e-12, abs=0), f"step {step}"


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "random"])
def test_eval_transforms_equal_open_clips(mode, interpolation):
    open_clip = pytest.importorskip("open_clip")
    import numpy as np
    from PIL import Image

    import fastclip

    seed = int(torch.randint(0, 2**31, ()).item())
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (37, 61, 3), dtype=np.uint8))
    options = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    expected = open_clip.image_transform(24, is_train=False, resize_mode=mode, interpolation=interpolation, **options)
    ours = fastclip.image_transform(24, train=False, resize_mode=mode, interpolation=interpolation, **options)
    torch.testing.assert_close(ours(image), expected(image), rtol=0, atol=0, msg=lambda m: f"seed {seed}: {m}")


def test_aug_cfg_builds_open_clips_training_augmentations():
    config = parse_args(["--dataset-type", "synthetic", "--aug-cfg", "scale=(0.5, 1.0)", "color_jitter=(0.4, 0.4, 0.4, 0.1)",
                         "color_jitter_prob=0.8", "gray_scale_prob=0.2"])
    from fastclip.train.build import image_transforms

    _, training = image_transforms(config, 32)
    names = [type(step).__name__ for step in training.transforms]
    assert names[:4] == ["RandomResizedCrop", "ConvertRGB", "RandomApply", "RandomGrayscale"]
    assert training.transforms[0].scale == (0.5, 1.0) and training.transforms[2].p == 0.8


def test_dataset_resampled_draws_shards_by_source_weight(tmp_path):
    pytest.importorskip("webdataset")
    from fastclip.data.webdataset_dataset import WebDatasetPairs

    for name in ("a-0.tar", "a-1.tar", "b-0.tar"):
        (tmp_path / name).write_bytes(b"")
    urls = f"{tmp_path}/a-{{0..1}}.tar::{tmp_path}/b-0.tar"
    only_b = WebDatasetPairs(urls, None, None, resampled=True, source_weights=[0.0, 1.0])
    assert set(only_b._my_shards(0)) == {f"{tmp_path}/b-0.tar"}
    both = WebDatasetPairs(urls, None, None, resampled=True)
    draws = [shard for index in range(40) for shard in both._my_shards(index)]
    assert len(set(draws)) == 3 and both._my_shards(5) == both._my_shards(5)  # seeded: a resume replays them


# ------------------------------------------------------------------------------------ one open_clip-style run


def tiny_args(logs, *extra):
    """2 steps an epoch of fastclip-tiny at 32 px (synthetic), open_clip's layout under ``logs``."""
    return ["--dataset-type", "synthetic", "--train-num-samples", "16", "--batch-size", "8", "--force-image-size",
            "32", "--workers", "0", "--lr", "1e-3", "--seed", "1", "--no-progress", "--logs", str(logs), "--name",
            "tiny", *extra]


@pytest.fixture(scope="module")
def open_clip_run(tmp_path_factory):
    """Epoch 1-2 with const-cooldown, --save-most-recent, wandb offline and --val-data; then resumed to epoch 3
    with a warm-up longer than the run. Returns (logs, stdout of the first run, stdout of the resume)."""
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("open_clip_run")
    (root / "val").mkdir()
    val = write_pairs(root / "val", 6)
    logs = root / "logs"
    with mock.patch.dict("os.environ", {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}), \
            mock.patch("sys.stdout", new=io.StringIO()) as first:
        assert main(tiny_args(logs, "--epochs", "2", "--warmup", "1", "--lr-scheduler", "const-cooldown",
                              "--epochs-cooldown", "1", "--save-most-recent", "--save-frequency", "0",
                              "--report-to", "wandb", "--wandb-project-name", "launch-test", "--wandb-notes", "n",
                              "--val-data", str(val), "--val-num-samples", "4")) == 0
    with mock.patch.dict("os.environ", {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}), \
            mock.patch("sys.stdout", new=io.StringIO()) as second:
        assert main(tiny_args(logs, "--epochs", "3", "--warmup", "100", "--resume", "latest", "--report-to",
                              "wandb")) == 0
    return logs, first.getvalue(), second.getvalue()


def test_logs_and_name_give_open_clips_layout_and_keep_the_newest_most_recent_checkpoint(open_clip_run):
    logs, first, second = open_clip_run
    run = logs / "tiny"
    assert {"checkpoints", "out.log", "params.txt", "metrics.jsonl", "results.json", "wandb"} <= \
        {path.name for path in run.iterdir()}
    # --save-most-recent wrote step 2 and step 4 in the first run; each replaced the one before
    assert [path.name for path in (run / "checkpoints").iterdir()] == ["step_00000006"]
    assert "model fastclip-tiny" in (run / "out.log").read_text() and "resumed from" in (run / "params.txt").read_text()
    assert "global batch 8 (8 per process)" in first and "global batch 8 (8 per process)" in second  # also on resume
    assert f"final checkpoint {run / 'checkpoints' / 'step_00000004'}" in first


def test_const_cooldown_and_val_frequency_in_the_trainer(open_clip_run):
    logs, first, _ = open_clip_run
    records = [json.loads(line) for line in open(logs / "tiny" / "metrics.jsonl")]
    rates = {record["step"]: record["lr"] for record in records if record["kind"] == "train" and record["step"] <= 4}
    # 4 steps, warm-up 1, the last epoch (2 steps) decays linearly from 1e-3 to 0: open_clip's const_lr_cooldown
    assert [rates[step] for step in (1, 2, 3, 4)] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])
    assert [record["step"] for record in records if record["kind"] == "val"] == [2]  # after epoch 1
    assert first.count("validation retrieval: ") == 2  # after epoch 1 and at the end
    assert all(0 <= record["val/image_to_text_R@1"] <= 1 for record in records if record["kind"] == "val")


def test_wandb_logs_offline_under_the_runs_lineage_id(open_clip_run):
    logs, _, _ = open_clip_run
    manifest = json.loads((logs / "tiny" / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    offline = list((logs / "tiny" / "wandb").glob(f"offline-run-*-{manifest['run_id']}"))
    assert len(offline) == 2, list((logs / "tiny" / "wandb").iterdir())  # the first run and its resume, one id
    assert all(list(folder.glob("*.wandb")) for folder in offline)


def test_a_warmup_longer_than_the_run_is_warned_about_before_the_first_step(open_clip_run):
    _, _, second = open_clip_run
    lines = second.splitlines()
    warning = next(index for index, line in enumerate(lines) if "WARNING: --warmup 100 is longer than the whole run"
                   in line)
    assert warning < next(index for index, line in enumerate(lines) if line.startswith("step "))


def test_eval_takes_the_run_folder_and_says_which_checkpoint(open_clip_run, tmp_path, capsys):
    from fastclip.eval.main import main as evaluate

    logs, _, _ = open_clip_run
    write_pairs(tmp_path, 5)
    assert evaluate(["--task", "retrieval", "--checkpoint", str(logs / "tiny"), "--data", str(tmp_path / "pairs.csv"),
                     "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"evaluating its newest checkpoint, {logs / 'tiny' / 'checkpoints' / 'step_00000006'}" in out
    summary = next(line for line in out.splitlines() if line.startswith("retrieval on"))
    assert "image_to_text_R@1" in summary and "5 pairs" in summary
    assert json.loads(out[out.index("{"):])["pairs"] == 5
    for missing in ("latest", str(tmp_path / "nothing")):
        assert evaluate(["--task", "retrieval", "--checkpoint", missing]) == 2
        error = capsys.readouterr().err
        assert error.startswith("fastclip eval: --checkpoint") and "does not exist" in error


def test_a_refused_run_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--train-data", str(tmp_path / "missing.csv"), "--workers", "0"]) == 2  # refused after the folder check
    assert main(["--train-data", str(tmp_path / "missing.csv"), "--logs", "L", "--name", "n", "--workers", "0"]) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    error = capsys.readouterr().err
    assert error.count("fastclip train: ") == 2 and "ValueError" not in error  # the prefix eval uses too


def test_version_is_shown_by_the_command_and_by_info(capsys):
    import fastclip
    from fastclip.info import main as info

    completed = subprocess.run([sys.executable, "-m", "fastclip", "--version"], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0 and completed.stdout.strip() == f"fastclip {fastclip.__version__}"
    assert info([]) == 0
    assert capsys.readouterr().out.startswith(f"fastclip {fastclip.__version__}, python")


def test_the_run_name_open_clip_would_give(tmp_path):
    from fastclip.train.run_dir import open_clip_run_name

    config = parse_args(["--dataset-type", "synthetic", "--model", "RN-Tiny", "--lr", "0.001", "--batch-size", "8",
                         "--workers", "2", "--precision", "amp_bf16"])
    name = open_clip_run_name(config, tmp_path)
    assert re.fullmatch(r"\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d-model_RN-Tiny-lr_0.001-b_8-j_2-p_amp_bf16", name), name


@pytest.mark.parametrize("saved, now", [((8, 1), (16, 1)), ((8, 2), (8, 1)), ((4, 2), (8, 3))])
def test_a_resume_on_another_batch_shape_goes_on_from_the_same_sample_of_the_epoch(saved, now):
    """docs/design.md section 6: what resume.py does when the batch size or world size changes (map-style data)."""
    from fastclip.data.loader import ShardedEpochSampler

    size, seed, epoch, done = 101, 7, 2, 3  # 3 global batches of the saved shape trained
    (batch, world), (new_batch, new_world) = saved, now

    def global_order(batch, world, start_batch=0):
        ranks = [list(ShardedEpochSampler(size, batch, rank=rank, world_size=world, seed=seed, epoch=epoch,
                                          start_batch=start_batch)) for rank in range(world)]
        return [ranks[rank][index] for index in range(len(ranks[0])) for rank in range(world)]  # round-robin

    consumed = done * batch * world
    restart = consumed // (new_batch * new_world) * new_batch * new_world  # a whole batch of the new shape
    resumed = global_order(new_batch, new_world, start_batch=restart // (new_batch * new_world))
    uninterrupted = global_order(batch, world)
    common = min(len(resumed), len(uninterrupted) - restart)
    assert common > 0 and resumed[:common] == uninterrupted[restart:restart + common]
