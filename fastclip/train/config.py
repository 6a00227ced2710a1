"""``TrainConfig``: every setting of a training run, as one typed, immutable value.

The CLI (``train/args.py``) parses flags into a ``TrainConfig``; Python code builds one directly::

    from fastclip.train import TrainConfig, train
    results = train(TrainConfig(model="RN-Tiny", dataset_type="synthetic", train_num_samples=256, epochs=1))

Field names are the flags' (``--batch-size`` is ``batch_size``), open_clip's where open_clip has the
flag. A field left ``None`` that has a preset is filled on construction: from ``EMBEDDED_PRESET`` for
the embedded shapes run (no ``train_data``), from ``GENERIC_DEFAULTS`` otherwise; a value given always
wins. Construction checks the values and raises ValueError naming the flag to fix.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastclip.precision import PRECISIONS

DATASET_TYPES = ("auto", "csv", "webdataset", "synthetic")
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "xformers", "math")
LR_SCHEDULERS = ("cosine", "const")
FSDP_CHECKPOINT_LAYOUTS = ("full", "sharded")

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
#: Defaults for fields the preset does not set (open_clip's values where it has the flag).
GENERIC_DEFAULTS = {
    "model": "fastclip-tiny",
    "batch_size": 64,
    "epochs": 32,
    "lr": 5e-4,
    "wd": 0.2,
    "warmup": 10000,
    "workers": None,  # filled with fastclip.data.loader.default_workers(): min(4, the CPUs this process may use)
    "keep_last": 3,
}
#: Train samples of the synthetic set when ``train_num_samples`` is not given.
SYNTHETIC_DEFAULT_SAMPLES = 10000


@dataclass(frozen=True)
class TrainConfig:
    """One training run. See the module docstring; ``fastclip train --help`` describes each field."""

    # data
    train_data: str | None = None            # CSV or webdataset shards; None: the embedded shapes set
    val_data: str | None = None              # CSV of held-out pairs: retrieval recall@k at the end
    dataset_type: str | None = "auto"        # auto | csv | webdataset | synthetic (auto, None: from train_data)
    train_num_samples: int | None = None
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    workers: int | None = None
    no_augment: bool = False
    cache_dir: str | None = None
    embedded_train_size: int | None = None
    embedded_val_size: int | None = None
    # model
    model: str | None = None
    pretrained: str | None = None
    force_image_size: int | None = None
    attn_impl: str = "auto"
    grad_checkpointing: bool = False
    patch_dropout: float = 0.0               # --force-patch-dropout (alias --patch-dropout)
    siglip: bool = False
    torchcompile: bool = False
    # LiT locks (fastclip.model.lock)
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = False
    # optimisation
    batch_size: int | None = None            # per process
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    wd: float | None = None
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int | None = None
    lr_scheduler: str = "cosine"
    grad_clip_norm: float | None = None
    precision: str | None = None             # None: fastclip.precision.default_precision(device), chosen in run()
    accum_freq: int = 1
    max_nonfinite_steps: int = 20
    # distributed
    local_loss: bool = False
    gather_with_grad: bool = False
    dist_backend: str | None = None
    device: str | None = None
    dist_timeout: float = 1800.0
    seed: int = 0
    # sharding (FSDP2, fastclip.train.fsdp)
    fsdp: bool = False
    fsdp_no_reshard_after_forward: bool = False
    fsdp_offload_cpu: bool = False
    fsdp_checkpoint: str | None = None       # full | sharded (None: full); only with fsdp
    # output
    output_dir: str | None = None
    resume: str | None = None
    save_frequency: int = 1
    save_every_n_steps: int = 0
    keep_last: int | None = None
    zeroshot_frequency: int = 1
    imagenet_val: str | None = None          # class-per-folder directory for zero-shot during training
    classnames: str | None = None            # its class names (fastclip.data.image_folder.read_classnames)
    zeroshot_templates: str = "imagenet"
    report_to: str = ""
    log_every_n_steps: int = 1
    progress_every_n_steps: int | None = None  # plain progress lines when stdout is not a terminal (None: ~20 a run)
    profile: int = 0
    no_progress: bool = False

    def __post_init__(self) -> None:
        embedded = self.train_data is None and self.dataset_type in (None, "auto", "csv")
        filled = {}
        if self.dataset_type in (None, "auto"):
            filled["dataset_type"] = auto_dataset_type(self.train_data)
        preset = {**GENERIC_DEFAULTS, **(EMBEDDED_PRESET if embedded else {})}
        filled.update({name: value for name, value in preset.items() if getattr(self, name) is None})
        if filled.get("workers", self.workers) is None:
            from fastclip.data.loader import default_workers

            filled["workers"] = default_workers()
        if (filled.get("dataset_type", self.dataset_type) == "synthetic") and not self.train_num_samples:
            filled["train_num_samples"] = SYNTHETIC_DEFAULT_SAMPLES
        for name, value in filled.items():
            object.__setattr__(self, name, value)
        _validate(self)

    @property
    def embedded(self) -> bool:
        """Whether the run trains on the embedded shapes set (no ``train_data``, CSV type)."""
        return self.train_data is None and self.dataset_type == "csv"

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def auto_dataset_type(train_data: str | None) -> str:
    """open_clip's ``--dataset-type auto``: by the last extension of ``train_data`` (csv/tsv: csv; tar:
    webdataset, which covers brace patterns and '::' lists of shards); no data: csv (the embedded set)."""
    if train_data is None:
        return "csv"
    name = str(train_data)
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if extension in ("csv", "tsv"):
        return "csv"
    if extension == "tar":
        return "webdataset"
    raise ValueError(f"--dataset-type auto cannot tell the format of --train-data {name!r} (it goes by the "
                     "extension: .csv/.tsv or .tar); name it with --dataset-type csv|webdataset")


def config_defaults() -> dict:
    """{field name: default} of :class:`TrainConfig` (what the CLI shows and fills in)."""
    return {field.name: field.default for field in dataclasses.fields(TrainConfig)}


_ZERO_MEANS = {"--keep-last": "keep every checkpoint", "--save-every-n-steps": "only at epoch ends",
               "--save-frequency": "never at epoch ends", "--zeroshot-frequency": "only at the end",
               "--workers": "load in the main process", "--warmup": "no warm-up", "--profile": "no trace",
               "--lock-image-unlocked-groups": "lock the whole tower",
               "--lock-text-unlocked-layers": "lock the whole tower", "--progress-every-n-steps": "no progress lines"}
_CHOICES = {"--precision": ("precision", PRECISIONS), "--dataset-type": ("dataset_type", DATASET_TYPES),
            "--attn-impl": ("attn_impl", ATTENTION_IMPLEMENTATIONS),
            "--lr-scheduler": ("lr_scheduler", LR_SCHEDULERS)}


def _validate(config: TrainConfig) -> None:
    for flag, (name, choices) in _CHOICES.items():
        if getattr(config, name) not in choices and not (name == "precision" and config.precision is None):
            raise ValueError(f"{flag} {getattr(config, name)!r} is not one of {', '.join(choices)}")
    positive = {"--batch-size": config.batch_size, "--accum-freq": config.accum_freq, "--epochs": config.epochs,
                "--max-nonfinite-steps": config.max_nonfinite_steps}
    if config.max_steps is not None:
        positive["--max-steps"] = config.max_steps
    if config.train_num_samples is not None:
        positive["--train-num-samples"] = config.train_num_samples
    positive["--log-every-n-steps"] = config.log_every_n_steps
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    not_negative = {"--keep-last": config.keep_last, "--save-every-n-steps": config.save_every_n_steps,
                    "--save-frequency": config.save_frequency, "--zeroshot-frequency": config.zeroshot_frequency,
                    "--workers": config.workers, "--warmup": config.warmup, "--profile": config.profile,
                    "--lock-image-unlocked-groups": config.lock_image_unlocked_groups,
                    "--lock-text-unlocked-layers": config.lock_text_unlocked_layers,
                    "--progress-every-n-steps": config.progress_every_n_steps or 0}
    for flag, value in not_negative.items():
        if value < 0:
            raise ValueError(f"{flag} must be >= 0 (0 means {_ZERO_MEANS[flag]}), got {value}")
    if not 0.0 <= config.patch_dropout < 1.0:
        raise ValueError(f"--force-patch-dropout is the share of patches dropped, in [0, 1); got {config.patch_dropout}")
    if not config.dist_timeout > 0:  # also rejects nan
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {config.dist_timeout}")
    if config.batch_size % config.accum_freq:
        raise ValueError(f"--batch-size {config.batch_size} is not divisible by --accum-freq {config.accum_freq}; "
                         "each step splits the batch into accum-freq equal micro-batches")
    if config.dataset_type == "webdataset" and not config.train_num_samples:
        raise ValueError("--dataset-type webdataset needs --train-num-samples (samples per epoch)")
    if config.dataset_type in ("csv", "webdataset") and not config.embedded and not config.train_data:
        raise ValueError(f"--dataset-type {config.dataset_type} needs --train-data")
    reports = [item for item in config.report_to.split(",") if item.strip()]
    unknown = [item for item in reports if item.strip() not in ("tensorboard", "none")]
    if unknown:
        raise ValueError(f"--report-to {unknown} is not supported; use 'tensorboard' (metrics.jsonl is "
                         "always written)")
    if config.val_data and not str(config.val_data).endswith((".csv", ".tsv")):
        raise ValueError("--val-data takes a CSV/TSV file (same columns as --train-data)")
    if config.gather_with_grad and not config.local_loss and config.siglip:
        raise ValueError("--gather-with-grad applies to the CLIP loss; drop it with --siglip")
    from fastclip.train.folder_zeroshot import check_folder_options
    from fastclip.train.fsdp import check_fsdp_options
    from fastclip.train.lit import check_lock_options

    check_lock_options(config)
    check_folder_options(config)
    check_fsdp_options(config)
