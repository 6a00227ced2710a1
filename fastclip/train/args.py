"""Command-line flags of ``fastclip train``: open_clip's names where open_clip has the flag.

Parsing gives a :class:`~fastclip.train.config.TrainConfig`: its fields are the flags, and its defaults
(config.py) are the ones ``--help`` shows. With no ``--train-data`` the run uses the embedded shapes set
and ``EMBEDDED_PRESET`` fills every flag the user did not give; an explicit flag always wins.
"""
from __future__ import annotations

import argparse

from fastclip.precision import PRECISIONS
from fastclip.train.config import ATTENTION_IMPLEMENTATIONS, DATASET_TYPES, LR_SCHEDULERS, TrainConfig, config_defaults


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastclip train",
        description="Train CLIP. With no arguments: generate the embedded shapes set (once, cached) and "
                    "train a small CLIP on CPU in a few minutes, then print zero-shot accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train-data", default=None, help="CSV file, or webdataset shards "
                      "('shards-{0000..0099}.tar'); omit for the embedded shapes set")
    data.add_argument("--val-data", default=None, help="CSV of held-out pairs: image<->text recall@k at the end")
    data.add_argument("--dataset-type", choices=DATASET_TYPES, default=None,
                      help="default: csv (webdataset when --train-data ends in .tar)")
    data.add_argument("--train-num-samples", type=int, default=None,
                      help="samples per epoch (needed for webdataset; the size of the synthetic set)")
    data.add_argument("--csv-img-key")
    data.add_argument("--csv-caption-key")
    data.add_argument("--csv-separator")
    data.add_argument("--workers", type=int, default=None, help="DataLoader workers per process")
    data.add_argument("--no-augment", action="store_true",
                      help="use the eval transform for training (the embedded set always does: its "
                           "captions name positions that a random crop would move)")
    data.add_argument("--cache-dir", default=None,
                      help="where the embedded set is generated (default $FASTCLIP_CACHE or ~/.cache/fastclip)")
    data.add_argument("--embedded-train-size", type=int, default=None,
                      help="images in the embedded train split (default: ShapesConfig's)")
    data.add_argument("--embedded-val-size", type=int, default=None,
                      help="images in the seen and shifted held-out splits; unseen gets half")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, help="a fastclip model name")
    model.add_argument("--pretrained", default=None, help="local path of weights to start from")
    model.add_argument("--force-image-size", type=int, default=None,
                       help="train at this image size instead of the config's (position embeddings resized)")
    model.add_argument("--attn-impl", choices=ATTENTION_IMPLEMENTATIONS)
    model.add_argument("--grad-checkpointing", action="store_true")
    model.add_argument("--patch-dropout", type=float)
    model.add_argument("--siglip", action="store_true", help="train with the SigLIP loss")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=None, help="per process")
    optim.add_argument("--epochs", type=int, default=None)
    optim.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    optim.add_argument("--lr", type=float, default=None)
    optim.add_argument("--wd", type=float, default=None)
    optim.add_argument("--beta1", type=float)
    optim.add_argument("--beta2", type=float)
    optim.add_argument("--eps", type=float)
    optim.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    optim.add_argument("--lr-scheduler", choices=LR_SCHEDULERS)
    optim.add_argument("--grad-clip-norm", type=float, default=None)
    optim.add_argument("--precision", choices=PRECISIONS)
    optim.add_argument("--accum-freq", type=int,
                       help="micro-batches per step, with feature caching (GradCache)")
    optim.add_argument("--max-nonfinite-steps", type=int,
                       help="abort after this many non-finite steps in a row")

    dist = parser.add_argument_group("distributed")
    dist.add_argument("--local-loss", action="store_true")
    dist.add_argument("--gather-with-grad", action="store_true")
    dist.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    dist.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    dist.add_argument("--dist-timeout", type=float,
                      help="seconds a collective may wait for the other ranks before this rank gives up with an "
                           "error (the process group timeout, as NCCL's), so a stalled or dead rank cannot hang "
                           "the others forever")
    dist.add_argument("--seed", type=int)

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default=None, help="default ./runs/<timestamp>; with --resume latest, the "
                     "newest run under ./runs")
    out.add_argument("--resume", default=None, help="'latest' (the newest checkpoint of the run in --output-dir) "
                     "or a checkpoint folder (another folder than --output-dir's starts a branch there)")
    out.add_argument("--save-frequency", type=int, help="save every N epochs (0: never)")
    out.add_argument("--save-every-n-steps", type=int, help="also save every N steps")
    out.add_argument("--keep-last", type=int, default=None, help="checkpoints kept (0: all; default 3, 1 for "
                     "the embedded run)")
    out.add_argument("--zeroshot-frequency", type=int,
                     help="zero-shot evaluation every N epochs on the embedded set (0: only at the end)")
    out.add_argument("--report-to", help="'tensorboard' or '' (metrics.jsonl is always written)")
    out.add_argument("--log-every-n-steps", type=int)
    out.add_argument("--profile", type=int, help="write a torch.profiler trace of N steps")
    out.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.set_defaults(**config_defaults())  # TrainConfig holds the defaults
    return parser


def parse_args(argv: list[str] | None) -> TrainConfig:
    """Parse ``argv`` into a checked :class:`TrainConfig` (ValueError names the flag to fix)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))
