"""Zero-shot (prompt ensembling), retrieval recall@k and the linear probe, against brute-force oracles."""
import functools
import random

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip.eval import linear_probe, retrieval, templates, zeroshot


def _random_unit(n, d):
    return F.normalize(torch.randn(n, d), dim=-1)


def test_imagenet_templates_are_clips_80_and_all_have_a_placeholder():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert list(templates.IMAGENET_TEMPLATES) == [make("{}") for make in OPENAI_IMAGENET_TEMPLATES]
    assert len(templates.IMAGENET_TEMPLATES) == 80
    assert all("{}" in t for t in templates.IMAGENET_TEMPLATES + templates.SHAPES_TEMPLATES)


def test_templates_file_and_named_sets(tmp_path):
    (tmp_path / "t.txt").write_text("a {} here\n\nthe {}\n")
    assert templates.load_templates(str(tmp_path / "t.txt")) == ("a {} here", "the {}")
    assert templates.load_templates("imagenet") is templates.IMAGENET_TEMPLATES
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match="placeholder"):
        templates.load_templates(str(tmp_path / "bad.txt"))


def test_topk_accuracy_matches_a_per_row_loop(seed):
    logits, labels = torch.randn(37, 200), torch.randint(0, 200, (37,))
    result = zeroshot.topk_accuracy(logits, labels, (1, 5, 10))
    for k in (1, 5, 10):
        expected = sum(int(labels[i] in logits[i].argsort(descending=True)[:k]) for i in range(37)) / 37
        assert result[f"top{k}"] == pytest.approx(expected)


def test_prompt_ensemble_is_the_renormalised_mean_of_normalised_prompt_embeddings(seed):
    model = fastclip.create_model("fastclip-tiny").eval()
    tokenizer = functools.partial(fastclip.tokenize, truncate=True)
    names, prompts = ["red star", "blue ring", "pink heart"], ("a photo of a {}.", "a {}.", "the big {} there")
    classifier = zeroshot.build_zero_shot_classifier(model, names, prompts, tokenizer, torch.device("cpu"))
    with torch.no_grad():
        for row, name in enumerate(names):
            embedded = model.encode_text(fastclip.tokenize([p.format(name) for p in prompts]))
            expected = F.normalize(F.normalize(embedded, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(classifier[row], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_groups", [False, True])
def test_retrieval_recall_matches_a_brute_force_rank_count(with_groups, seed):
    n, d = 37, 200
    images, texts = _random_unit(n, d), _random_unit(n, d)
    texts[:10] = F.normalize(images[:10] + 0.3 * torch.randn(10, d), dim=-1)  # some easy pairs
    groups = torch.randint(0, 12, (n,)) if with_groups else torch.arange(n)
    result = retrieval.retrieval_recall(images, texts, groups=groups if with_groups else None)
    similarity = images @ texts.T
    for k in (1, 5, 10):
        for name, matrix in (("image_to_text", similarity), ("text_to_image", similarity.T)):
            hits = 0
            for query in range(n):
                top = matrix[query].argsort(descending=True)[:k].tolist()
                hits += any(groups[item] == groups[query] for item in top)
            assert result[f"{name}_R@{k}"] == pytest.approx(hits / n)


def test_caption_groups_merge_identical_captions():
    assert retrieval.caption_groups(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 0, 2, 1]


def test_linear_probe_reaches_the_bayes_accuracy_of_separable_clusters_and_k_shot_picks_k_per_class(seed):
    classes, d = 7, 200
    centres = 4 * _random_unit(classes, d)
    labels = torch.randint(0, classes, (600,))
    features = centres[labels] + torch.randn(600, d) * 0.5
    result = linear_probe.linear_probe(features[:400], labels[:400], features[400:], labels[400:])
    assert result["top1"] > 0.97, f"seed {seed}"
    chosen = linear_probe.k_shot_indices(labels[:400], shots=3, seed=random.randrange(1000))
    assert torch.bincount(labels[chosen], minlength=classes).tolist() == [3] * classes
    few = linear_probe.linear_probe(features[:400], labels[:400], features[400:], labels[400:], shots=3)
    assert few["top1"] > 1.5 / classes, f"seed {seed}"  # well above chance from 3 examples a class


def test_logistic_regression_reaches_the_optimum(seed):
    features, labels = torch.randn(90, 13) * 3 + 1, torch.randint(0, 4, (90,))
    probe = linear_probe.fit_logistic_regression(features, labels, 4, weight_decay=1e-2)
    # at the optimum of this strictly convex objective the gradient vanishes
    weight, bias = probe.weight.clone().requires_grad_(), probe.bias.clone().requires_grad_()
    linear_probe.probe_objective(probe.standardise(features), labels, weight, bias, 1e-2).backward()
    assert weight.grad.abs().max() < 1e-6 and bias.grad.abs().max() < 1e-6
    torch.testing.assert_close(probe.standardise(features).mean(0), torch.zeros(13, dtype=torch.float64),
                               atol=1e-9, rtol=0)
