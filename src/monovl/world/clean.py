"""Clean drawings: circles, squares and triangles drawn with plain Pillow calls on pure white, in CSS colours, at any
size and place — the way another program would draw them, not the world's renderer. A multiple-choice check (colour,
shape, count) that a model recognises shapes beyond the pictures it was trained on; never used for training."""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

from monovl.world import data as D
from monovl.world.images import COLOURS, SHAPES, b64, png_bytes

CSS = {"red": (255, 0, 0), "orange": (255, 165, 0), "yellow": (255, 255, 0), "green": (0, 128, 0),
       "blue": (0, 0, 255), "purple": (128, 0, 128), "brown": (139, 69, 19), "black": (0, 0, 0)}  # visible on white
KINDS = ("circle", "square", "triangle")
SIZES = ((128, 128), (160, 120), (120, 160), (200, 200), (256, 192))
CATEGORIES = ("colour", "shape", "count")


def _boxes(rng: random.Random, w: int, h: int, n: int) -> list[tuple[int, int, int, int]]:
    """`n` non-overlapping squares (x0, y0, x1, y1), sides between a sixth and a third of the shorter image side."""
    out: list[tuple[int, int, int, int]] = []
    while len(out) < n:
        side = rng.randint(min(w, h) // 6, min(w, h) // 3)
        x0, y0 = rng.randint(2, w - side - 3), rng.randint(2, h - side - 3)
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] + 3 < b[0] or b[2] + 3 < box[0] or box[3] + 3 < b[1] or b[3] + 3 < box[1] for b in out):
            out.append(box)
    return out


def drawing(rng: random.Random) -> tuple[bytes, list[tuple[str, str]]]:
    """One PNG of one to three shapes of distinct kinds and colours, and its (kind, colour) list."""
    w, h = rng.choice(SIZES)
    n = rng.randint(1, 3)
    kinds, colours = rng.sample(KINDS, n), rng.sample(sorted(CSS), n)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for kind, colour, (x0, y0, x1, y1) in zip(kinds, colours, _boxes(rng, w, h, n)):
        outline, width = (rng.choice(((0, 0, 0), CSS[colour])), rng.randint(1, 3)) if rng.random() < 0.5 else (None, 0)
        if kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=CSS[colour], outline=outline, width=width)
        elif kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=CSS[colour], outline=outline, width=width)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=CSS[colour], outline=outline, width=width)
    return png_bytes(img), list(zip(kinds, colours))


def _question(category: str, shapes: list[tuple[str, str]], rng: random.Random) -> D.QA:
    kind, colour = rng.choice(shapes)
    if category == "colour":
        return D.QA("colour", f"What colour is the {kind}?", colour, tuple(COLOURS), "")
    if category == "shape":
        return D.QA("shape", f"What shape is the {colour} object?", kind, SHAPES, "")
    return D.QA("count", "How many shapes are there in the picture?", str(len(shapes)), ("1", "2", "3", "4"), "")


def clean_bench(rng: random.Random, n: int) -> list[dict]:
    """`n` multiple-choice rows (VLMEvalKit columns), one image each, balanced over colour, shape and count."""
    rows = []
    for k in range(n):
        png, shapes = drawing(rng)
        qa = _question(CATEGORIES[k % 3], shapes, rng)
        options, answer = D.as_choice(qa, rng)
        rows.append({"index": k, "image": b64(png), "question": qa.question,
                     **dict(zip(D.LETTERS, options)), "answer": answer, "category": qa.category})
    return rows
