"""``fastclip eval --task zeroshot|retrieval|linear-probe``: evaluate a checkpoint.

    fastclip eval --task zeroshot --checkpoint runs/x                 # a run folder: its newest checkpoint
    fastclip eval --task zeroshot --checkpoint runs/x/checkpoints/step_00000200          # embedded set
    fastclip eval --task zeroshot --checkpoint model.safetensors --data imagenet/val \\
        --classnames classnames.txt --templates imagenet                            # class-per-folder
    fastclip eval --task zeroshot --checkpoint model.safetensors --data val.csv \\
        --classnames classes.txt --label-key label --templates imagenet
    fastclip eval --task retrieval --checkpoint model.safetensors --data pairs.csv
    fastclip eval --task linear-probe --checkpoint ckpt --train-data train.csv --data test.csv --shots 16

A folder as ``--data`` is a class-per-folder image set (ImageNet-val layout: DIR/<class folder>/*.jpg; the
folders sorted by name are the labels). ``--classnames`` is then a text file with one name per line in
sorted-folder order, or a JSON file: a map folder -> name, or a list; without it the folder names are used.

Without ``--data`` the embedded shapes set is used (the newest one generated at the model's image size
in the cache, else a fresh default one): zero-shot prints the same table as ``fastclip train``;
retrieval uses its seen split; the linear probe trains on its train split.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from fastclip.data.loader import default_workers
from fastclip.precision import PRECISIONS, check_precision_supported, default_precision

TASKS = ("zeroshot", "retrieval", "linear-probe")


def build_parser() -> argparse.ArgumentParser:
    from fastclip.cli import FlagParser, HelpFormatter, plain_text

    parser = FlagParser(prog="fastclip eval", description=plain_text(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("--task", choices=TASKS, required=True, help="what to measure")
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its newest checkpoint), a trainer checkpoint folder, or a weights file "
                             "(.safetensors/.pt/.bin)")
    parser.add_argument("--model", default=None, help="config name (default: read from the checkpoint)")
    parser.add_argument("--data", default=None, help="evaluation CSV, or (zeroshot) a class-per-folder image directory "
                        "(default: the embedded set)")
    parser.add_argument("--train-data", default=None, help="linear probe: the CSV to fit on")
    parser.add_argument("--dataset-type", choices=("csv", "webdataset"), default="csv",
                        help="format of --data when it is a file (default: csv)")
    parser.add_argument("--num-samples", type=int, default=None, help="webdataset: samples to read")
    parser.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths (default: filepath)")
    parser.add_argument("--csv-caption-key", default="title", help="CSV column of captions (default: title)")
    parser.add_argument("--csv-separator", default="\t", help="CSV field separator (default: a tab)")
    parser.add_argument("--label-key", default="label", help="CSV column with integer class labels")
    parser.add_argument("--classnames", default=None, help="class names: a text file, one per line in label (sorted-folder) order, or "
                        "for a folder a JSON map folder -> name (default for a folder: its folder names)")
    parser.add_argument("--templates", default=None,
                        help="imagenet | shapes | single | a file with one '{}' template per line "
                        "(default: imagenet; the embedded set uses its own)")
    parser.add_argument("--shots", type=int, default=None, help="linear probe: k examples per class")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="linear probe L2 strength")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: min(2, the CPUs this process may use))")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="autocast / weight precision, open_clip's names (fastclip.precision; default: "
                             "amp_bf16 on a GPU with bf16, amp on sm7x, fp32 on CPU, as fastclip train)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--cache-dir", default=None, help="where the embedded set is cached (as for train)")
    parser.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    return parser


def resolve_checkpoint(checkpoint: str) -> Path:
    """``--checkpoint``'s path: a run folder becomes its newest checkpoint (said on stdout)."""
    from fastclip.checkpoint_format import MANIFEST_FILE

    path = Path(checkpoint)
    if not path.exists():
        hint = (" ('latest' is a --resume word of fastclip train; here give the run folder, e.g. runs/<time>, for its "
                "newest checkpoint)" if checkpoint == "latest" else "")
        raise ValueError(f"--checkpoint {checkpoint!r} does not exist{hint}; give a run folder, a checkpoint folder "
                         "(<run>/checkpoints/step_NNNNNNNN) or a weights file")
    if path.is_dir() and not (path / MANIFEST_FILE).exists() and (path / "checkpoints").is_dir():
        from fastclip.train.checkpoint import list_checkpoints

        found = list_checkpoints(path)
        if not found:
            raise ValueError(f"--checkpoint {checkpoint}: the run folder holds no checkpoint in {path / 'checkpoints'}")
        print(f"--checkpoint {checkpoint} is a run folder: evaluating its newest checkpoint, {found[-1]}", flush=True)
        return found[-1]
    return path


def load_model_for_eval(checkpoint: str, model_name: str | None, device: torch.device, precision: str):
    """The model of a run folder (its newest checkpoint), a trainer checkpoint folder or a weights file, in eval mode."""
    import fastclip
    from fastclip.checkpoint_format import MODEL_FILE, is_sharded_checkpoint, read_weights, verify_checkpoint

    path = resolve_checkpoint(checkpoint)
    if path.is_dir():
        verify_checkpoint(path)  # the manifest and checksums; raises CorruptCheckpointError (a ValueError)
        path = path if is_sharded_checkpoint(path) else path / MODEL_FILE
    if not path.exists():
        raise ValueError(f"--checkpoint {checkpoint!r} is neither a run folder, a checkpoint folder nor a weights "
                         "file")
    model = read_weights(path, lambda weights: fastclip.model_from_state_dict(str(weights), name=model_name,
                                                                              device=device, precision=precision))
    return model.eval()


def _csv_features(model, csv_path, args, transform, tokenizer, device):
    from fastclip.eval.features import encode_csv_images

    return encode_csv_images(model, csv_path, transform=transform, tokenizer=tokenizer, device=device,
                             precision=args.precision, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                             separator=args.csv_separator, batch_size=args.batch_size, workers=args.workers)


def _labels(dataset, key: str) -> torch.Tensor:
    if key not in dataset.rows[0]:
        raise ValueError(f"the CSV has no label column {key!r} (columns: {list(dataset.rows[0])}); set --label-key")
    return torch.tensor([int(row[key]) for row in dataset.rows])


def _folder_zero_shot(model, args, transform, tokenizer, device) -> dict:
    from fastclip.data.image_folder import class_folders, read_classnames
    from fastclip.eval.templates import load_templates
    from fastclip.eval.zeroshot import evaluate_image_folder, format_folder_result

    classnames = read_classnames(args.classnames, class_folders(args.data))
    results = evaluate_image_folder(model, args.data, classnames=classnames,
                                    templates=load_templates(args.templates or "imagenet"), transform=transform,
                                    tokenizer=tokenizer, device=device, precision=args.precision,
                                    batch_size=args.batch_size, workers=args.workers)
    print(format_folder_result(args.data, results))
    print(json.dumps(results, indent=1))
    return results


def run(args) -> dict:
    import fastclip
    from fastclip.eval.linear_probe import linear_probe
    from fastclip.eval.retrieval import MATCH_RULE, caption_retrieval
    from fastclip.eval.templates import load_templates
    from fastclip.eval.zeroshot import build_zero_shot_classifier, format_folder_result, zero_shot_accuracy

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.workers is None:
        args.workers = default_workers(2)
    if args.precision is None:
        args.precision, why = default_precision(device)
        if args.precision != "fp32":
            print(f"fastclip eval: precision {args.precision} ({why})", file=sys.stderr)
    check_precision_supported(args.precision, device)
    model = load_model_for_eval(args.checkpoint, args.model, device, args.precision)
    transform = fastclip.image_transform(model.config.vision.image_size, train=False)
    tokenizer = functools.partial(fastclip.tokenize, context_length=model.context_length, truncate=True)

    if args.data is None:
        from fastclip.data.shapes import ShapesConfig, ensure_shapes_dataset, find_cached_shapes_dataset

        size = model.config.vision.image_size
        root = find_cached_shapes_dataset(size, args.cache_dir) or ensure_shapes_dataset(ShapesConfig(image_size=size),
                                                                                          args.cache_dir)
        if args.task == "zeroshot":
            from fastclip.eval.embedded import evaluate_embedded, format_report

            results = evaluate_embedded(model, root, transform=transform, tokenizer=tokenizer, device=device,
                                        precision=args.precision, batch_size=args.batch_size,
                                        workers=args.workers)
            print(format_report(results))
            return results
        args.data = str(root / "val_seen.csv")
        args.train_data = args.train_data or str(root / "train.csv")
    if not Path(args.data).exists():
        raise ValueError(f"--data {args.data!r} does not exist")
    if Path(args.data).is_dir():
        if args.task != "zeroshot":
            raise ValueError(f"--data {args.data} is a folder: a class-per-folder set serves --task zeroshot; "
                             f"--task {args.task} reads a CSV")
        return _folder_zero_shot(model, args, transform, tokenizer, device)
    if args.dataset_type != "csv":
        raise ValueError("fastclip eval reads CSV files; convert shards with the webdataset tools first")

    dataset, image_features = _csv_features(model, args.data, args, transform, tokenizer, device)
    if args.task == "zeroshot":
        if args.classnames is None:
            raise ValueError("--task zeroshot on your own data needs --classnames (one name per line)")
        classnames = [line.strip() for line in Path(args.classnames).read_text().splitlines() if line.strip()]
        templates = load_templates(args.templates or "imagenet")
        classifier = build_zero_shot_classifier(model, classnames, templates, tokenizer, device, args.precision)
        results = zero_shot_accuracy(image_features, classifier, _labels(dataset, args.label_key))
        results.update(classes=len(classnames), templates=len(templates), images=len(dataset))
        print(format_folder_result(args.data, results))
    elif args.task == "retrieval":
        results = caption_retrieval(model, image_features, dataset.captions, tokenizer=tokenizer, device=device,
                                    precision=args.precision)
        print(f"retrieval on {args.data}: " + ", ".join(f"{key} {100 * value:.1f}%" for key, value in results.items())
              + f" ({len(dataset)} pairs; {MATCH_RULE})")
        results.update(pairs=len(dataset), match=MATCH_RULE)
    else:
        if args.train_data is None:
            raise ValueError("--task linear-probe needs --train-data (the CSV to fit the probe on)")
        train_set, train_features = _csv_features(model, args.train_data, args, transform, tokenizer, device)
        results = linear_probe(train_features, _labels(train_set, args.label_key), image_features,
                               _labels(dataset, args.label_key), shots=args.shots, weight_decay=args.weight_decay)
        results.update(shots=args.shots or "all", train_images=len(train_features), test_images=len(dataset))
    print(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastclip eval``; returns the exit status (2: a user error, said in one line)."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        results = run(args)
    except ValueError as error:
        print(f"fastclip eval: {error}", file=sys.stderr)
        return 2
    if args.output:
        from fastclip.io import atomic_write_json

        atomic_write_json(Path(args.output), results)
    return 0
