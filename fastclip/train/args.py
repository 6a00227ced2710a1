"""Command-line flags of ``fastclip train``: open_clip's names where open_clip has the flag.

With no ``--train-data`` the run uses the embedded procedural shapes set and the ``EMBEDDED_PRESET``
below fills every flag the user did not give; an explicit flag always wins.
"""
from __future__ import annotations

import argparse
import datetime
import os

from fastclip.cli import HelpFormatter
from fastclip.data.loader import default_workers
from fastclip.model.config import list_models
from fastclip.train.folder_zeroshot import check_folder_options
from fastclip.train.lit import check_lock_options

PRECISIONS = ("fp32", "amp", "amp_bf16", "bf16", "fp16")
RUNS_ROOT = "runs"  # where runs without --output-dir go
DATASET_TYPES = ("auto", "csv", "webdataset", "synthetic")

#: Settings of the no-argument run: RN-Tiny (a small ModifiedResNet; 12.4 M parameters, half of them
#: the token embedding) at 32 px on CPU: 3 epochs of the 16,000 training images, about 3 minutes
#: on 2 cores including data generation and evaluation. A ViT of the same cost
#: stays at chance on shape within this budget (measured; see fastclip/data/shapes.py).
EMBEDDED_PRESET = {
    "model": "RN-Tiny",
    "force_image_size": 32,
    "batch_size": 128,
    "epochs": 3,
    "lr": 2e-3,
    "wd": 0.1,
    "warmup": 20,
    "workers": 1,
    "keep_last": 1,
}
#: Defaults for flags the preset does not set (open_clip's values where it has the flag).
GENERIC_DEFAULTS = {
    "model": "fastclip-tiny",
    "batch_size": 64,
    "epochs": 32,
    "lr": 5e-4,
    "wd": 0.2,
    "warmup": 10000,
    "workers": None,  # default_workers(): min(4, the CPUs this process may use)
    "keep_last": 3,
}


def _preset_default(name: str) -> str:
    return f"default: {EMBEDDED_PRESET[name]} for the embedded run, else {GENERIC_DEFAULTS[name]}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastclip train",
        description="Train CLIP. With no arguments: generate the embedded shapes set (once, cached) and\n"
                    "train a small CLIP on CPU in a few minutes, then print zero-shot accuracy.",
        formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train-data", default=None, help="CSV file, or webdataset shards "
                      "('shards-{0000..0099}.tar'); omit for the embedded shapes set")
    data.add_argument("--val-data", default=None, help="CSV of held-out pairs: image<->text recall@k at the end")
    data.add_argument("--dataset-type", choices=DATASET_TYPES, default="auto",
                      help="auto (open_clip's rule): webdataset when --train-data ends in .tar (brace patterns "
                           "and '::' lists too), csv for .csv/.tsv (default: auto)")
    data.add_argument("--train-num-samples", type=int, default=None,
                      help="samples per epoch (needed for webdataset; the size of the synthetic set)")
    data.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths")
    data.add_argument("--csv-caption-key", default="title", help="CSV column of captions")
    data.add_argument("--csv-separator", default="\t", help="CSV field separator")
    data.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: "
                      "min(4, the CPUs this process may use); 1 for the embedded run)")
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
    model.add_argument("--force-image-size", type=int, default=None,
                       help="train at this image size instead of the config's (position embeddings resized)")
    model.add_argument("--attn-impl", default="auto", choices=("auto", "sdpa", "xformers", "math"),
                       help="attention kernel (fastclip info lists what runs here)")
    model.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute each block in backward: less activation memory, more compute")
    model.add_argument("--force-patch-dropout", "--patch-dropout", dest="patch_dropout", type=float, default=0.0,
                       metavar="P",
                       help="FLIP patch dropout in training, in [0, 1): the share of image patches dropped; "
                            "overrides the model config's (ViT towers)")
    model.add_argument("--siglip", action="store_true", help="train with the SigLIP loss")
    model.add_argument("--torchcompile", action="store_true",
                       help="torch.compile the model, and the loss with fullgraph=True (single process)")
    lock = parser.add_argument_group("locking (LiT), open_clip's layer groups")
    lock.add_argument("--lock-image", action="store_true", help="freeze the image tower")
    lock.add_argument("--lock-image-unlocked-groups", type=int, default=0,
                      help="with --lock-image: leave the last N layer groups of the image tower trainable (ViT)")
    lock.add_argument("--lock-image-freeze-bn-stats", action="store_true",
                      help="with --lock-image: BatchNorm layers keep and use their running statistics")
    lock.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    lock.add_argument("--lock-text-unlocked-layers", type=int, default=0,
                      help="with --lock-text: leave the last N layer groups of the text tower trainable")
    lock.add_argument("--lock-text-freeze-layer-norm", action="store_true",
                      help="with --lock-text: freeze the LayerNorms of the locked groups too (else they train)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=None, help=f"per process ({_preset_default('batch_size')})")
    optim.add_argument("--epochs", type=int, default=None, help=_preset_default("epochs"))
    optim.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    optim.add_argument("--lr", type=float, default=None, help=f"peak learning rate ({_preset_default('lr')})")
    optim.add_argument("--wd", type=float, default=None, help=f"AdamW weight decay ({_preset_default('wd')})")
    optim.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    optim.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2")
    optim.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon")
    optim.add_argument("--warmup", type=int, default=None, help=f"linear warm-up steps ({_preset_default('warmup')})")
    optim.add_argument("--lr-scheduler", choices=("cosine", "const"), default="cosine",
                       help="after the warm-up: cosine decay to 0, or constant")
    optim.add_argument("--grad-clip-norm", type=float, default=None, help="clip the total gradient norm to this")
    optim.add_argument("--precision", choices=PRECISIONS, default="fp32", help="amp: autocast fp16 with a "
                       "GradScaler; amp_bf16: autocast bf16; bf16/fp16: parameters in that dtype")
    optim.add_argument("--accum-freq", type=int, default=1,
                       help="micro-batches per step, with feature caching (GradCache)")
    optim.add_argument("--max-nonfinite-steps", type=int, default=20,
                       help="abort after this many non-finite steps in a row")

    dist = parser.add_argument_group("distributed")
    dist.add_argument("--local-loss", action="store_true",
                      help="each rank's loss over its own rows against all gathered columns (open_clip's)")
    dist.add_argument("--gather-with-grad", action="store_true",
                      help="gather features with their gradient (the exact full-batch gradient)")
    dist.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    dist.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    dist.add_argument("--dist-timeout", type=float, default=1800.0,
                      help="seconds a collective may wait for the other ranks before this rank gives up with an "
                           "error (the process group timeout, as NCCL's), so a stalled or dead rank cannot hang "
                           "the others forever")
    dist.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentations")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default=None, help="default ./runs/<timestamp>; with --resume latest, the "
                     "newest run under ./runs")
    out.add_argument("--resume", default=None, help="'latest' (the newest checkpoint of the run in --output-dir) "
                     "or a checkpoint folder (another folder than --output-dir's starts a branch there)")
    out.add_argument("--save-frequency", type=int, default=1, help="save every N epochs (0: never)")
    out.add_argument("--save-every-n-steps", type=int, default=0, help="also save every N steps")
    out.add_argument("--keep-last", type=int, default=None, help="checkpoints kept (0: all; default 3, 1 for "
                     "the embedded run)")
    out.add_argument("--zeroshot-frequency", type=int, default=1,
                     help="zero-shot evaluation every N epochs, on the embedded set or --imagenet-val (0: only at "
                          "the end)")
    out.add_argument("--imagenet-val", default=None, metavar="DIR",
                     help="zero-shot top-1/top-5 on this class-per-folder image directory (ImageNet-val layout, "
                          "DIR/<class>/*.jpg) every --zeroshot-frequency epochs and at the end")
    out.add_argument("--classnames", default=None, help="class names of --imagenet-val: a text file, one per line in "
                     "sorted-folder order, or JSON (folder -> name map, or a list) (default: the folder names)")
    out.add_argument("--zeroshot-templates", default="imagenet",
                     help="prompts for --imagenet-val: imagenet (CLIP's 80), single, shapes, or a file of '{}' lines")
    out.add_argument("--report-to", default="", help="'tensorboard' or '' (metrics.jsonl is always written)")
    out.add_argument("--log-every-n-steps", type=int, default=1, help="write metrics.jsonl every N steps")
    out.add_argument("--progress-every-n-steps", type=int, default=None,
                     help="when stdout is not a terminal: a plain progress line every N steps (default: about 20 "
                          "lines a run; 0: none)")
    out.add_argument("--profile", type=int, default=0, help="write a torch.profiler trace of N steps")
    out.add_argument("--no-progress", action="store_true", help="no tqdm progress bar (plain lines instead)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and fill defaults from the embedded preset or the generic defaults."""
    args = build_parser().parse_args(argv)
    args.embedded = args.train_data is None and args.dataset_type in ("auto", "csv")
    if args.dataset_type == "auto":
        args.dataset_type = auto_dataset_type(args.train_data)
    defaults = EMBEDDED_PRESET if args.embedded else GENERIC_DEFAULTS
    for name, value in {**GENERIC_DEFAULTS, **defaults}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.workers is None:
        args.workers = default_workers()
    _validate(args)
    return args


def auto_dataset_type(train_data: str | None) -> str:
    """open_clip's ``--dataset-type auto``: by the last extension of ``--train-data`` (csv/tsv: csv, tar:
    webdataset, which covers brace patterns and '::' lists of shards); no data: csv (the embedded set)."""
    if train_data is None:
        return "csv"
    extension = str(train_data).rsplit(".", 1)[-1].lower() if "." in str(train_data) else ""
    if extension in ("csv", "tsv"):
        return "csv"
    if extension == "tar":
        return "webdataset"
    raise ValueError(f"--dataset-type auto cannot tell the format of --train-data {train_data!r} (it goes by the "
                     "extension: .csv/.tsv or .tar); name it with --dataset-type csv|webdataset")


def timestamped_output_dir(root: str = RUNS_ROOT) -> str:
    """``<root>/<date_time>``, with ``-2``, ``-3`` ... appended when a run started in the same second."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    candidate, count = os.path.join(root, stamp), 1
    while os.path.exists(candidate):
        count += 1
        candidate = os.path.join(root, f"{stamp}-{count}")
    return candidate


_ZERO_MEANS = {"--keep-last": "keep every checkpoint", "--save-every-n-steps": "only at epoch ends",
               "--save-frequency": "never at epoch ends", "--zeroshot-frequency": "only at the end",
               "--workers": "load in the main process", "--warmup": "no warm-up", "--profile": "no trace",
               "--lock-image-unlocked-groups": "lock the whole tower", "--lock-text-unlocked-layers": "lock the whole "
               "tower", "--progress-every-n-steps": "no progress lines"}


def _validate(args: argparse.Namespace) -> None:
    positive = {"--batch-size": args.batch_size, "--accum-freq": args.accum_freq, "--epochs": args.epochs,
                "--max-nonfinite-steps": args.max_nonfinite_steps}
    if args.max_steps is not None:
        positive["--max-steps"] = args.max_steps
    if args.train_num_samples is not None:
        positive["--train-num-samples"] = args.train_num_samples
    positive["--log-every-n-steps"] = args.log_every_n_steps
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    not_negative = {"--keep-last": args.keep_last, "--save-every-n-steps": args.save_every_n_steps,
                    "--save-frequency": args.save_frequency, "--zeroshot-frequency": args.zeroshot_frequency,
                    "--workers": args.workers, "--warmup": args.warmup, "--profile": args.profile,
                    "--lock-image-unlocked-groups": args.lock_image_unlocked_groups,
                    "--lock-text-unlocked-layers": args.lock_text_unlocked_layers,
                    "--progress-every-n-steps": args.progress_every_n_steps or 0}
    for flag, value in not_negative.items():
        if value < 0:
            raise ValueError(f"{flag} must be >= 0 (0 means {_ZERO_MEANS[flag]}), got {value}")
    if not 0.0 <= args.patch_dropout < 1.0:
        raise ValueError(f"--force-patch-dropout is the share of patches dropped, in [0, 1); got {args.patch_dropout}")
    if not args.dist_timeout > 0:  # also rejects nan
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    if args.batch_size % args.accum_freq:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --accum-freq {args.accum_freq}; "
                         "each step splits the batch into accum-freq equal micro-batches")
    if args.dataset_type == "synthetic" and not args.train_num_samples:
        args.train_num_samples = 10000
    if args.dataset_type == "webdataset" and not args.train_num_samples:
        raise ValueError("--dataset-type webdataset needs --train-num-samples (samples per epoch)")
    if args.dataset_type in ("csv", "webdataset") and not args.embedded and not args.train_data:
        raise ValueError(f"--dataset-type {args.dataset_type} needs --train-data")
    reports = [item for item in args.report_to.split(",") if item.strip()]
    unknown = [item for item in reports if item.strip() not in ("tensorboard", "none")]
    if unknown:
        raise ValueError(f"--report-to {unknown} is not supported; use 'tensorboard' (metrics.jsonl is "
                         "always written)")
    if args.val_data and not str(args.val_data).endswith((".csv", ".tsv")):
        raise ValueError("--val-data takes a CSV/TSV file (same columns as --train-data)")
    if args.gather_with_grad and not args.local_loss and args.siglip:
        raise ValueError("--gather-with-grad applies to the CLIP loss; drop it with --siglip")
    check_lock_options(args)
    check_folder_options(args)
