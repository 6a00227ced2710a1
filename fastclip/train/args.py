"""Command-line flags of ``fastclip train``: open_clip's names where open_clip has the flag.

Parsing gives a :class:`~fastclip.train.config.TrainConfig`: its fields are the flags, and its defaults
(config.py) are the ones ``--help`` shows. With no ``--train-data`` the run uses the embedded shapes set
and ``EMBEDDED_PRESET`` fills every flag the user did not give; an explicit flag always wins.
"""
from __future__ import annotations

import argparse
import ast

from fastclip.cli import FlagParser, HelpFormatter
from fastclip.data.loader import DEFAULT_WORKERS_CAP
from fastclip.model.config import list_models
from fastclip.precision import PRECISIONS
from fastclip.train.config import (ATTENTION_IMPLEMENTATIONS, AUGMENTATION_KEYS, DATASET_TYPES, EMBEDDED_PRESET,
                                   FSDP_CHECKPOINT_LAYOUTS, GENERIC_DEFAULTS, IMAGE_INTERPOLATIONS, IMAGE_RESIZE_MODES,
                                   LR_SCHEDULERS, TrainConfig, config_defaults)
from fastclip.train.metrics import PLAIN_PROGRESS_LINES
from fastclip.train.open_clip_flags import add_refused_flags


def _preset_default(name: str) -> str:
    return f"default: {EMBEDDED_PRESET[name]} for the embedded run, else {GENERIC_DEFAULTS[name]}"


class KeyValues(argparse.Action):
    """``--aug-cfg scale='(0.5, 1.0)' color_jitter=0.4``: ``key=value`` pairs, values read as Python literals
    (a plain string when they are not one), as open_clip's ParseKwargs."""

    def __call__(self, parser, namespace, values, option_string=None):
        pairs = {}
        for item in values:
            key, separator, text = item.partition("=")
            if not separator or not key:
                raise argparse.ArgumentError(self, f"{item!r} is not key=value (e.g. scale='(0.5, 1.0)')")
            try:
                pairs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                pairs[key] = text
        setattr(namespace, self.dest, pairs)


class SquareSize(argparse.Action):
    """``--force-image-size 224`` or open_clip's ``--force-image-size 224 224``: one side of a square image."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(set(values)) != 1 or len(values) > 2:
            raise argparse.ArgumentError(self, f"fastclip trains square images; give one size, not {values}")
        setattr(namespace, self.dest, values[0])


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="fastclip train",
        description="Train CLIP. With no arguments: generate the embedded shapes set (once, cached) and\n"
                    "train a small CLIP on CPU in a few minutes, then print zero-shot accuracy.",
        formatter_class=HelpFormatter)  # each default shown once, from TrainConfig (set_defaults below)
    data = parser.add_argument_group("data")
    data.add_argument("--train-data", default=None, help="CSV file, or webdataset shards "
                      "('shards-{0000..0099}.tar'); omit for the embedded shapes set")
    data.add_argument("--val-data", default=None, help="CSV of held-out pairs: image<->text recall@k at the end")
    data.add_argument("--dataset-type", choices=DATASET_TYPES,
                      help="auto (open_clip's rule): webdataset when --train-data ends in .tar (brace patterns "
                           "and '::' lists too), csv for .csv/.tsv")
    data.add_argument("--train-num-samples", type=int, default=None,
                      help="samples per epoch (needed for webdataset; the size of the synthetic set)")
    data.add_argument("--val-num-samples", type=int, default=None,
                      help="evaluate the first N pairs of --val-data (default: all)")
    data.add_argument("--dataset-resampled", action="store_true",
                      help="webdataset: draw shards with replacement (open_clip's), seeded by seed, epoch, rank "
                           "and worker, so a resume replays them")
    data.add_argument("--train-data-upsampling-factors", metavar="W1::W2",
                      help="with --dataset-resampled and a '::' list of sources: relative draw weight of each "
                           "source's shards, e.g. 1::2::0.5 (default: every shard alike)")
    data.add_argument("--csv-img-key", help="CSV column of image paths")
    data.add_argument("--csv-caption-key", help="CSV column of captions")
    data.add_argument("--csv-separator", help="CSV field separator")
    data.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: "
                      f"min({DEFAULT_WORKERS_CAP}, the CPUs this process may use); {EMBEDDED_PRESET['workers']} for "
                      "the embedded run)")
    data.add_argument("--image-mean", type=float, nargs="+", metavar="MEAN",
                      help="per-channel mean of the image normalisation (default: OpenAI CLIP's)")
    data.add_argument("--image-std", type=float, nargs="+", metavar="STD",
                      help="per-channel std of the image normalisation (default: OpenAI CLIP's)")
    data.add_argument("--image-interpolation", choices=IMAGE_INTERPOLATIONS,
                      help="interpolation of the evaluation resize (default: bicubic; random means bicubic there); "
                           "training crops are bicubic, as in open_clip")
    data.add_argument("--image-resize-mode", choices=IMAGE_RESIZE_MODES,
                      help="evaluation resize: shortest side + center crop (default), longest side + pad, or "
                           "squash to the square")
    data.add_argument("--aug-cfg", nargs="*", action=KeyValues, metavar="KEY=VALUE",
                      help="training augmentation, open_clip's keys: " + ", ".join(AUGMENTATION_KEYS) +
                           " (e.g. scale='(0.5, 1.0)')")
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
    model.add_argument("--model", default=None, help="one of " + ", ".join(list_models()) +
                       f" ({_preset_default('model')})")
    model.add_argument("--pretrained", default=None, help="weights to start from: a file, a trainer checkpoint "
                       "folder, or an open_clip tag already in the local cache (nothing is downloaded)")
    model.add_argument("--force-image-size", type=int, nargs="+", action=SquareSize, default=None, metavar="SIZE",
                       help="train at this image size instead of the config's (position embeddings resized)")
    model.add_argument("--force-context-length", type=int, default=None,
                       help="text context length instead of the config's (position embeddings resized)")
    model.add_argument("--force-quick-gelu", action="store_true",
                       help="QuickGELU activations (as OpenAI's weights were trained with): same as the "
                            "-quickgelu model name")
    model.add_argument("--attn-impl", choices=ATTENTION_IMPLEMENTATIONS,
                       help="attention kernel (fastclip info lists what runs here)")
    model.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute each block in backward: less activation memory, more compute")
    model.add_argument("--force-patch-dropout", "--patch-dropout", dest="patch_dropout", type=float, metavar="P",
                       help="FLIP patch dropout in training, in [0, 1): the share of image patches dropped; "
                            "overrides the model config's (ViT towers)")
    model.add_argument("--siglip", action="store_true", help="train with the SigLIP loss")
    model.add_argument("--torchcompile", action="store_true",
                       help="torch.compile the model, and the loss with fullgraph=True (single process)")
    lock = parser.add_argument_group("locking (LiT), open_clip's layer groups")
    lock.add_argument("--lock-image", action="store_true", help="freeze the image tower")
    lock.add_argument("--lock-image-unlocked-groups", type=int,
                      help="with --lock-image: leave the last N layer groups of the image tower trainable (ViT)")
    lock.add_argument("--lock-image-freeze-bn-stats", action="store_true",
                      help="with --lock-image: BatchNorm layers keep and use their running statistics")
    lock.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    lock.add_argument("--lock-text-unlocked-layers", type=int,
                      help="with --lock-text: leave the last N layer groups of the text tower trainable")
    lock.add_argument("--lock-text-freeze-layer-norm", action="store_true",
                      help="with --lock-text: freeze the LayerNorms of the locked groups too (else they train)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=None, help=f"per process ({_preset_default('batch_size')})")
    optim.add_argument("--epochs", type=int, default=None, help=_preset_default("epochs"))
    optim.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    optim.add_argument("--lr", type=float, default=None, help=f"peak learning rate ({_preset_default('lr')})")
    optim.add_argument("--wd", type=float, default=None, help=f"AdamW weight decay ({_preset_default('wd')})")
    optim.add_argument("--beta1", type=float, help="AdamW beta1")
    optim.add_argument("--beta2", type=float, help="AdamW beta2")
    optim.add_argument("--eps", type=float, help="AdamW epsilon")
    optim.add_argument("--warmup", type=int, default=None,
                       help=f"linear warm-up steps ({_preset_default('warmup')})")
    optim.add_argument("--lr-scheduler", choices=LR_SCHEDULERS,
                       help="after the warm-up: cosine decay to 0, constant, or const-cooldown (constant, then a "
                            "decay over the last --epochs-cooldown epochs)")
    optim.add_argument("--epochs-cooldown", type=int, help="const-cooldown: epochs of the final decay")
    optim.add_argument("--lr-cooldown-end", type=float, help="const-cooldown: learning rate at the end")
    optim.add_argument("--lr-cooldown-power", type=float,
                       help="const-cooldown: decay (1 - t)^power from --lr to --lr-cooldown-end (1: linear)")
    optim.add_argument("--skip-scheduler", action="store_true",
                       help="no schedule at all: --lr from the first step (no warm-up, no decay), as open_clip")
    optim.add_argument("--opt", help="optimiser: adamw (open_clip's timm/<name> optimisers are not run)")
    optim.add_argument("--grad-clip-norm", type=float, default=None, help="clip the total gradient norm to this")
    optim.add_argument("--precision", choices=PRECISIONS, help="amp: autocast fp16 with a GradScaler; amp_bf16: "
                       "autocast bf16; bf16/fp16: the matmul weights in that dtype, LayerNorm and embeddings fp32; "
                       "pure_bf16/pure_fp16: every parameter, buffer and input in that dtype; no autocast for these "
                       "four (open_clip's meanings; default: amp_bf16 on a GPU with bf16, amp on sm7x, fp32 on CPU)")
    optim.add_argument("--accum-freq", type=int,
                       help="micro-batches per step, with feature caching (GradCache)")
    optim.add_argument("--max-nonfinite-steps", type=int,
                       help="abort after this many non-finite steps in a row")

    dist = parser.add_argument_group("distributed")
    dist.add_argument("--local-loss", action="store_true",
                      help="each rank's loss over its own rows against all gathered columns (open_clip's)")
    dist.add_argument("--gather-with-grad", action="store_true",
                      help="gather features with their gradient (the exact full-batch gradient)")
    dist.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    dist.add_argument("--dist-url", default=None,
                      help="env:// only: the rendezvous comes from torchrun's environment (--rdzv-endpoint)")
    dist.add_argument("--no-set-device-rank", action="store_true",
                      help="use cuda:0 in every process instead of cuda:<local rank> (one visible GPU per process)")
    dist.add_argument("--use-bn-sync", action="store_true",
                      help="SyncBatchNorm: BatchNorm statistics over the global batch (ResNet towers, DDP)")
    dist.add_argument("--ddp-static-graph", action="store_true", help="DistributedDataParallel(static_graph=True)")
    dist.add_argument("--loss-dist-impl",
                      help="distributed loss: gather or ring for CLIP; bidir, shift, reduce, gather or ring for "
                           "SigLIP (default: gather for CLIP, bidir for SigLIP)")
    dist.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    dist.add_argument("--dist-timeout", type=float,
                      help="seconds a collective may wait for the other ranks before this rank gives up with an "
                           "error (the process group timeout, as NCCL's), so a stalled or dead rank cannot hang "
                           "the others forever")
    dist.add_argument("--seed", type=int, help="seed of weights, data order and augmentations")
    shard = parser.add_argument_group("sharding (FSDP2; docs/scale_out.md)")
    shard.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over the "
                       "processes (FSDP2 fully_shard per residual block, then the root) instead of DDP; on one "
                       "process there is nothing to shard: it trains unsharded, with a note")
    shard.add_argument("--fsdp-no-reshard-after-forward", action="store_true",
                       help="keep each block's gathered parameters from forward to backward (faster, more memory)")
    shard.add_argument("--fsdp-offload-cpu", action="store_true",
                       help="keep the parameter, gradient and optimizer shards in CPU memory (the step runs on CPU)")
    shard.add_argument("--fsdp-checkpoint", choices=FSDP_CHECKPOINT_LAYOUTS, default=None,
                       help="full: weights and optimizer gathered to rank 0, in the format of DDP runs (default); "
                            "sharded: torch.distributed.checkpoint shards written by every rank, loadable on "
                            "another process count and in one process")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default=None, help="default ./runs/<timestamp>; with --resume latest, the "
                     "newest run under ./runs")
    out.add_argument("--logs", metavar="DIR",
                     help="open_clip's layout: the run folder is DIR/NAME (--name), instead of --output-dir")
    out.add_argument("--name", help="the run's folder name under --logs (default: open_clip's "
                     "<date>-model_<model>-lr_<lr>-b_<batch>-j_<workers>-p_<precision>; --logs defaults to ./logs)")
    out.add_argument("--log-local", action="store_true",
                     help="also write out-<rank>.log on the first process of every node (default: out.log on "
                          "rank 0 only)")
    out.add_argument("--debug", action="store_true", help="log at DEBUG level")
    out.add_argument("--resume", default=None, help="'latest' (the newest checkpoint of the run in --output-dir) "
                     "or a checkpoint folder (another folder than --output-dir's starts a branch there)")
    out.add_argument("--save-frequency", type=int, help="save every N epochs (0: never)")
    out.add_argument("--save-every-n-steps", type=int, help="also save every N steps")
    out.add_argument("--save-most-recent", action="store_true",
                     help="also a checkpoint at every epoch end; each replaces the previous one that was saved only "
                          "for this reason (open_clip's epoch_latest.pt)")
    out.add_argument("--delete-previous-checkpoint", action="store_true",
                     help="keep only the newest checkpoint of this run (same as --keep-last 1: never another run's, "
                          "never the final one)")
    out.add_argument("--keep-last", type=int, default=None,
                     help=f"checkpoints kept (0: all; {_preset_default('keep_last')})")
    out.add_argument("--zeroshot-frequency", type=int,
                     help="zero-shot evaluation every N epochs, on the embedded set or --imagenet-val (0: only at "
                          "the end)")
    out.add_argument("--imagenet-val", metavar="DIR",
                     help="zero-shot top-1/top-5 on this class-per-folder image directory (ImageNet-val layout, "
                          "DIR/<class>/*.jpg) every --zeroshot-frequency epochs and at the end")
    out.add_argument("--classnames", help="class names of --imagenet-val: a text file, one per line in sorted-folder "
                     "order, or JSON (folder -> name map, or a list) (default: the folder names)")
    out.add_argument("--zeroshot-templates",
                     help="prompts for --imagenet-val: imagenet (CLIP's 80), single, shapes, or a file of '{}' lines")
    out.add_argument("--val-frequency", type=int,
                     help="--val-data retrieval every N epochs and at the end (0: never)")
    out.add_argument("--report-to", help="'tensorboard', 'wandb', 'wandb,tensorboard' or 'all' (metrics.jsonl is "
                     "always written; WANDB_MODE=offline logs wandb without a network)")
    out.add_argument("--wandb-project-name", help="wandb project")
    out.add_argument("--wandb-notes", help="wandb run notes")
    out.add_argument("--log-every-n-steps", type=int, help="write metrics.jsonl every N steps")
    out.add_argument("--progress-every-n-steps", type=int,
                     help="when stdout is not a terminal (or there is no bar): a plain progress line every N "
                          "steps (default: about "
                          f"{PLAIN_PROGRESS_LINES} lines a run; 0: none)")
    out.add_argument("--profile", type=int, help="write a torch.profiler trace of N steps")
    out.add_argument("--no-progress", action="store_true", help="no tqdm progress bar (plain lines instead)")
    add_refused_flags(parser)  # open_clip's flags that do not apply: exit 2 with the reason
    parser.set_defaults(**config_defaults())  # TrainConfig holds the defaults
    return parser


def parse_args(argv: list[str] | None) -> TrainConfig:
    """Parse ``argv`` into a checked :class:`TrainConfig` (ValueError names the flag to fix)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))
