"""Prompt templates as data: CLIP's 80 ImageNet templates and the embedded shapes set's templates.

``{}`` is replaced by the class name. Any list of such strings works wherever templates are taken
(``fastclip eval --templates file.txt``, one template per line).
"""
from __future__ import annotations

#: The 80 prompt templates of OpenAI CLIP's ImageNet zero-shot evaluation (same order as open_clip).
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)

#: Prompts for the embedded shapes set; the first is the "single prompt" baseline of the report.
SHAPES_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "there is a {} in the picture.",
    "a small {}.",
    "a large {}.",
    "a {} on a plain background.",
    "a drawing of a {}.",
)

TEMPLATE_SETS = {"imagenet": IMAGENET_TEMPLATES, "shapes": SHAPES_TEMPLATES, "single": ("a photo of a {}.",)}


def load_templates(spec: str) -> tuple[str, ...]:
    """A named set (imagenet, shapes, single) or a text file with one template per line."""
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    from pathlib import Path

    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--templates {spec!r} is neither a named set {sorted(TEMPLATE_SETS)} nor a file")
    templates = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    bad = [template for template in templates if "{}" not in template]
    if not templates or bad:
        raise ValueError(f"{path}: every template needs a '{{}}' placeholder; offending: {bad[:3]}")
    return templates
