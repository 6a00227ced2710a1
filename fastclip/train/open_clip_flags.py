"""open_clip 3.3 training flags that ``fastclip train`` refuses, each with why and what to use instead.

Every flag of ``open_clip_train.params`` is either a flag of ``fastclip train`` with open_clip's meaning
(train/args.py) or listed here: the parser knows it, so an open_clip launch script gets exit status 2
and the reason, never argparse's "unrecognized arguments". docs/open_clip_flags.md is the table of both.
"""
from __future__ import annotations

import argparse

#: flag -> (takes a value, why it does not apply and what to use instead)
REFUSED = {
    "--horovod": (False, "Horovod is not supported; launch with torchrun (torch.distributed), as for every "
                         "multi-process fastclip run"),
    "--remote-sync": (True, "fastclip does not sync the run folder to S3/fsspec itself; sync --output-dir (or "
                            "--logs/--name) with your own tool, e.g. 'aws s3 sync' in the job script"),
    "--remote-sync-frequency": (True, "fastclip does not sync the run folder itself (see --remote-sync); sync "
                                      "the output folder with your own tool"),
    "--remote-sync-protocol": (True, "fastclip does not sync the run folder itself (see --remote-sync); sync "
                                     "the output folder with your own tool"),
    "--torchscript": (False, "TorchScript is not supported (torch.jit is deprecated); use --torchcompile"),
    "--trace": (False, "torch.jit.trace for inference is not supported; evaluate with 'fastclip eval', or "
                       "use --torchcompile for speed"),
    "--use-bnb-linear": (True, "bitsandbytes int8 linear layers are not supported; train in --precision "
                               "amp_bf16 or amp"),
    "--coca-caption-loss-weight": (True, "CoCa models are not implemented in fastclip (CLIP and SigLIP only)"),
    "--coca-contrastive-loss-weight": (True, "CoCa models are not implemented in fastclip (CLIP and SigLIP only)"),
    "--distill-model": (True, "distillation from a teacher model is not implemented; train without a teacher"),
    "--distill-pretrained": (True, "distillation from a teacher model is not implemented; train without a teacher"),
    "--force-custom-text": (False, "fastclip has one CLIP class whose text tower is always separate "
                                   "(CustomTextCLIP's layout is what it loads and saves); drop the flag"),
    "--copy-codebase": (False, "fastclip runs as an installed package, not from a copied source tree; the run "
                               "folder's params.txt records the fastclip version"),
    "--pretrained-image": (False, "fastclip's image towers are not timm models, so timm's ImageNet weights do "
                                  "not fit them; start from CLIP weights with --pretrained FILE"),
    "--imagenet-v2": (True, "ImageNet-v2's class folders are numbered 0..999, which do not sort in label order, "
                            "and fastclip ships no ImageNet class names; evaluate it with 'fastclip eval --task "
                            "zeroshot --data DIR --classnames names.json' (a JSON map folder -> class name)"),
    "--momentum": (True, "momentum applies to timm optimizers (--opt timm/...), which fastclip does not run; "
                         "fastclip trains with AdamW: set --beta1/--beta2"),
}


class Refused(argparse.Action):
    """A known flag that fastclip does not run: parsing it is an error that says why and what to use."""

    def __init__(self, option_strings, dest, reason: str, takes_value: bool, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?" if takes_value else 0,
                         default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        from fastclip.cli import FlagError

        raise FlagError(f"{option_string} (an open_clip flag) does not apply: {self.reason}")


def add_refused_flags(parser: argparse.ArgumentParser) -> None:
    """Register every flag of :data:`REFUSED` (hidden from --help; docs/open_clip_flags.md lists them)."""
    for flag, (takes_value, reason) in REFUSED.items():
        parser.add_argument(flag, action=Refused, reason=reason, takes_value=takes_value)
