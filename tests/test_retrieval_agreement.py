"""Issue 12: the trainer's table and ``fastclip eval --task retrieval`` count retrieval hits by one rule
(``fastclip.eval.retrieval.MATCH_RULE``), name it, and give the same numbers on the same checkpoint."""
import contextlib
import functools
import io
import json

import torch

import fastclip
from fastclip.eval.features import encode_csv_images, encode_texts
from fastclip.eval.main import load_model_for_eval
from fastclip.eval.main import main as eval_main
from fastclip.eval.retrieval import MATCH_RULE, retrieval_recall
from fastclip.train.main import main as train_main

RECALLS = [f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)]


def test_the_table_and_eval_retrieval_agree_exactly_on_the_seen_split(tmp_path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train_main(["--embedded-train-size", "256", "--embedded-val-size", "256", "--batch-size", "32",
                           "--max-steps", "4", "--warmup", "1", "--workers", "0", "--zeroshot-frequency", "0",
                           "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run"),
                           "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert MATCH_RULE in printed.getvalue()
    output = tmp_path / "retrieval.json"
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{results['steps']:08d}"
    with contextlib.redirect_stdout(io.StringIO()):  # the embedded set's seen split, found in the cache
        assert eval_main(["--task", "retrieval", "--checkpoint", str(checkpoint), "--cache-dir",
                          str(tmp_path / "cache"), "--workers", "0", "--output", str(output)]) == 0
    recalls = json.loads(output.read_text())
    assert recalls["match"] == MATCH_RULE
    assert recalls["pairs"] == results["evaluation"]["val_seen/images"] == 256
    assert {key: recalls[key] for key in RECALLS} == {key: results["evaluation"][f"val_seen/{key}"] for key in RECALLS}
    assert len({recalls[key] for key in RECALLS}) > 1  # real recalls, not a constant

    # The looser rule the table used before (captions naming the same five attributes are hits) gives
    # other numbers on this split: the check above tells the two rules apart.
    model = load_model_for_eval(str(checkpoint), None, torch.device("cpu"), "fp32")
    tokenizer = functools.partial(fastclip.tokenize, context_length=model.context_length, truncate=True)
    dataset, images = encode_csv_images(model, next((tmp_path / "cache").glob("shapes-*")) / "val_seen.csv",
                                        transform=fastclip.image_transform(32, train=False), tokenizer=tokenizer,
                                        device=torch.device("cpu"))
    texts = encode_texts(model, dataset.captions, tokenizer, torch.device("cpu"))
    keys = [tuple(row[k] for k in ("colour", "shape", "size", "position", "background")) for row in dataset.rows]
    ids = {}
    attribute_groups = torch.tensor([ids.setdefault(key, len(ids)) for key in keys])
    looser = retrieval_recall(images, texts, groups=attribute_groups)
    assert {key: looser[key] for key in RECALLS} != {key: recalls[key] for key in RECALLS}
