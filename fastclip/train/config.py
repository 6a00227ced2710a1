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
LR_SCHEDULERS = ("cosine", "const", "const-cooldown")
IMAGE_INTERPOLATIONS = ("bicubic", "bilinear", "random")
IMAGE_RESIZE_MODES = ("shortest", "longest", "squash")
#: --aug-cfg keys fastclip applies (open_clip's non-timm augmentation); the timm ones are refused
AUGMENTATION_KEYS = ("scale", "color_jitter", "color_jitter_prob", "gray_scale_prob")
_TIMM_AUGMENTATION_KEYS = ("ratio", "re_prob", "re_count", "use_timm")
REPORTERS = ("tensorboard", "wandb", "all", "none")
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
    val_num_samples: int | None = None       # evaluate the first N pairs of val_data
    dataset_resampled: bool = False          # webdataset shards drawn with replacement
    train_data_upsampling_factors: str | None = None  # "1::2::0.5": draw weight of each '::' source
    image_mean: tuple | None = None
    image_std: tuple | None = None
    image_interpolation: str | None = None   # eval resize interpolation (open_clip's)
    image_resize_mode: str | None = None     # eval resize: shortest | longest | squash
    aug_cfg: dict | None = None              # training augmentation: AUGMENTATION_KEYS
    workers: int | None = None
    no_augment: bool = False
    cache_dir: str | None = None
    embedded_train_size: int | None = None
    embedded_val_size: int | None = None
    # model
    model: str | None = None
    pretrained: str | None = None
    force_image_size: int | None = None
    force_context_length: int | None = None
    force_quick_gelu: bool = False
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
    epochs_cooldown: int | None = None       # const-cooldown: epochs of the final decay
    lr_cooldown_end: float = 0.0
    lr_cooldown_power: float = 1.0
    skip_scheduler: bool = False             # --lr at every step, no warm-up (open_clip's)
    opt: str = "adamw"
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
    dist_url: str | None = None              # env:// only
    no_set_device_rank: bool = False         # cuda:0 in every process
    use_bn_sync: bool = False
    ddp_static_graph: bool = False
    loss_dist_impl: str | None = None        # the loss's dist_impl (None: gather for CLIP, bidir for SigLIP)
    seed: int = 0
    # sharding (FSDP2, fastclip.train.fsdp)
    fsdp: bool = False
    fsdp_no_reshard_after_forward: bool = False
    fsdp_offload_cpu: bool = False
    fsdp_checkpoint: str | None = None       # full | sharded (None: full); only with fsdp
    # output
    output_dir: str | None = None
    logs: str | None = None                  # open_clip's layout: the run folder is logs/name
    name: str | None = None
    log_local: bool = False                  # out-<rank>.log on every node's first process too
    debug: bool = False
    resume: str | None = None
    save_frequency: int = 1
    save_every_n_steps: int = 0
    save_most_recent: bool = False           # a checkpoint at every epoch end, replacing the previous such one
    delete_previous_checkpoint: bool = False  # = keep_last 1
    keep_last: int | None = None
    zeroshot_frequency: int = 1
    val_frequency: int = 1
    imagenet_val: str | None = None          # class-per-folder directory for zero-shot during training
    classnames: str | None = None            # its class names (fastclip.data.image_folder.read_classnames)
    zeroshot_templates: str = "imagenet"
    report_to: str = ""
    wandb_project_name: str = "open-clip"
    wandb_notes: str = ""
    log_every_n_steps: int = 1
    progress_every_n_steps: int | None = None  # plain progress lines when stdout is not a terminal (None: ~20 a run)
    profile: int = 0
    no_progress: bool = False

    def __post_init__(self) -> None:
        embedded = self.train_data is None and self.dataset_type in (None, "auto", "csv")
        filled = {}
        if self.dataset_type in (None, "auto"):
            filled["dataset_type"] = auto_dataset_type(self.train_data)
        if self.delete_previous_checkpoint:
            if self.keep_last not in (None, 1):
                raise ValueError(f"--delete-previous-checkpoint keeps one checkpoint, --keep-last {self.keep_last} "
                                 "keeps more; give one of them")
            filled["keep_last"] = 1
        if self.force_quick_gelu and self.model and not self.model.endswith("-quickgelu"):
            filled["model"] = f"{self.model}-quickgelu"
        preset = {**GENERIC_DEFAULTS, **(EMBEDDED_PRESET if embedded else {})}
        filled.update({name: value for name, value in preset.items()
                       if getattr(self, name) is None and name not in filled})
        if self.force_quick_gelu and not self.model:
            filled["model"] = f"{filled['model']}-quickgelu"
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
    reports = [item.strip() for item in config.report_to.split(",") if item.strip()]
    unknown = [item for item in reports if item not in REPORTERS]
    if unknown:
        raise ValueError(f"--report-to {unknown} is not supported; use tensorboard, wandb, 'wandb,tensorboard' or "
                         "all (metrics.jsonl is always written)")
    import importlib.util

    for reporter, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if {reporter, "all"} & set(reports) and importlib.util.find_spec(package) is None:
            raise ValueError(f"--report-to {reporter} needs the {package} package: pip install {package}")
    _validate_open_clip_options(config)
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


def _validate_open_clip_options(config: TrainConfig) -> None:
    """The open_clip flags that only make sense together, or only with some values."""
    if config.output_dir is not None and (config.logs is not None or config.name is not None):
        raise ValueError("--output-dir and --logs/--name both name the run folder; give one (--logs DIR --name "
                         "NAME is DIR/NAME)")
    if config.logs is not None and config.logs.strip().lower() in ("", "none"):
        raise ValueError("--logs none (no run folder) is not supported: fastclip always writes metrics.jsonl and "
                         "results.json; to save no checkpoint use --save-frequency 0")
    if config.name is not None and (not config.name.strip() or "/" in config.name or config.name in (".", "..")):
        raise ValueError(f"--name {config.name!r} must be one folder name (no '/'); --logs gives the parent folder")
    if config.lr_scheduler == "const-cooldown":
        if config.epochs_cooldown is None:
            raise ValueError("--lr-scheduler const-cooldown needs --epochs-cooldown N (the epochs of the final decay)")
        if not 0 <= config.epochs_cooldown <= config.epochs:
            raise ValueError(f"--epochs-cooldown {config.epochs_cooldown} must be in [0, --epochs {config.epochs}]")
        if not config.lr_cooldown_power > 0:
            raise ValueError(f"--lr-cooldown-power must be > 0, got {config.lr_cooldown_power}")
    elif config.epochs_cooldown is not None:
        raise ValueError("--epochs-cooldown applies to --lr-scheduler const-cooldown; add that or drop it")
    opt = config.opt.lower()
    if opt.startswith("timm/"):
        raise ValueError(f"--opt {config.opt}: timm optimisers are not run by fastclip (its parameter groups, fused "
                         "AdamW and checkpoints assume AdamW); use --opt adamw")
    if opt != "adamw":
        raise ValueError(f"--opt {config.opt!r} is not an optimiser fastclip runs; use --opt adamw")
    if config.dist_url not in (None, "env://"):
        raise ValueError(f"--dist-url {config.dist_url}: fastclip takes the rendezvous from torchrun's environment "
                         "(env://); launch with torchrun --rdzv-endpoint HOST:PORT (or MASTER_ADDR/MASTER_PORT)")
    if config.loss_dist_impl is not None:
        from fastclip.loss import CLIP_DIST_IMPLS, SIGLIP_DIST_IMPLS

        choices = SIGLIP_DIST_IMPLS if config.siglip else CLIP_DIST_IMPLS
        if config.loss_dist_impl not in choices:
            raise ValueError(f"--loss-dist-impl {config.loss_dist_impl!r} is not a {'SigLIP' if config.siglip else 'CLIP'}"
                             f" loss option; choose one of {', '.join(choices)}")
    if config.val_num_samples is not None and config.val_num_samples < 1:
        raise ValueError(f"--val-num-samples must be >= 1, got {config.val_num_samples}")
    if config.val_frequency < 0:
        raise ValueError(f"--val-frequency must be >= 0 (0 means never), got {config.val_frequency}")
    if (config.dataset_resampled or config.train_data_upsampling_factors) and config.dataset_type != "webdataset":
        raise ValueError("--dataset-resampled and --train-data-upsampling-factors apply to --dataset-type webdataset")
    if config.train_data_upsampling_factors is not None:
        if not config.dataset_resampled:
            raise ValueError("--train-data-upsampling-factors weights the draws of --dataset-resampled; add it")
        upsampling_weights(config.train_data_upsampling_factors, config.train_data)
    for flag, values in (("--image-mean", config.image_mean), ("--image-std", config.image_std)):
        if values is not None and len(values) not in (1, 3):
            raise ValueError(f"{flag} takes 1 or 3 values (one per channel), got {len(values)}")
    if config.image_std is not None and not all(value > 0 for value in config.image_std):
        raise ValueError(f"--image-std must be positive, got {list(config.image_std)}")
    for flag, value, choices in (("--image-interpolation", config.image_interpolation, IMAGE_INTERPOLATIONS),
                                 ("--image-resize-mode", config.image_resize_mode, IMAGE_RESIZE_MODES)):
        if value is not None and value not in choices:
            raise ValueError(f"{flag} {value!r} is not one of {', '.join(choices)}")
    augmentation_options(config.aug_cfg)


def upsampling_weights(factors: str, train_data: str | None) -> list[float]:
    """``"1::2::0.5"`` -> [1.0, 2.0, 0.5], one weight per '::' source of ``train_data`` (ValueError otherwise)."""
    try:
        weights = [float(item) for item in factors.split("::")]
    except ValueError:
        raise ValueError(f"--train-data-upsampling-factors {factors!r}: numbers separated by '::' (e.g. 1::2::0.5)"
                         ) from None
    sources = len(str(train_data).split("::"))
    if len(weights) != sources:
        raise ValueError(f"--train-data-upsampling-factors gives {len(weights)} weight(s) for {sources} '::' "
                         "source(s) of --train-data; give one per source")
    if not all(weight >= 0 for weight in weights) or not any(weights):
        raise ValueError(f"--train-data-upsampling-factors must be >= 0 and not all 0, got {factors!r}")
    return weights


def augmentation_options(aug_cfg: dict | None) -> dict:
    """``--aug-cfg`` checked: the keys fastclip applies, with open_clip's value shapes."""
    options = dict(aug_cfg or {})
    timm = [key for key in options if key in _TIMM_AUGMENTATION_KEYS]
    if timm:
        raise ValueError(f"--aug-cfg {', '.join(timm)}: these are timm augmentations (open_clip's use_timm=True "
                         f"path), which fastclip does not run; it applies {', '.join(AUGMENTATION_KEYS)}")
    unknown = [key for key in options if key not in AUGMENTATION_KEYS]
    if unknown:
        raise ValueError(f"--aug-cfg {', '.join(unknown)}: unknown key(s); the keys are {', '.join(AUGMENTATION_KEYS)}")
    scale = options.get("scale")
    if scale is not None and not (isinstance(scale, (tuple, list)) and len(scale) == 2
                                  and 0 < float(scale[0]) <= float(scale[1]) <= 1):
        raise ValueError(f"--aug-cfg scale={scale!r}: give two fractions lo <= hi in (0, 1], e.g. scale='(0.5, 1.0)'")
    jitter = options.get("color_jitter")
    if options.get("color_jitter_prob") and not (isinstance(jitter, (tuple, list)) and len(jitter) == 4):
        raise ValueError("--aug-cfg color_jitter_prob needs color_jitter='(brightness, contrast, saturation, hue)'")
    for key in ("color_jitter_prob", "gray_scale_prob"):
        if key in options and not 0 <= float(options[key]) <= 1:
            raise ValueError(f"--aug-cfg {key} must be a probability in [0, 1], got {options[key]!r}")
    return options
