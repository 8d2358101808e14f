"""Scenes of the synthetic world and their rendering: one to four shapes on a background, maybe a word.

A `Scene` is pure data (sampled from a `random.Random`, so a seed fixes it); `render` draws it with Pillow and
`png_bytes` encodes it. Images are a few 112-pixel tiles in size, in several aspect ratios so tiling varies.
Positions are the cells of a 3×3 grid over the image.
"""
from __future__ import annotations

import base64
import functools
import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

TILE = 112
IMAGE_SIZES = ((112, 112), (224, 112), (112, 224), (224, 224), (336, 112))  # (width, height)
COLOURS = {"red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 60),
           "blue": (40, 80, 220), "purple": (140, 50, 180), "pink": (245, 130, 190), "brown": (130, 80, 40),
           "white": (255, 255, 255), "black": (0, 0, 0)}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (25, 25, 25),
               "light blue": (195, 220, 250), "light green": (200, 240, 200), "light yellow": (250, 245, 195)}
PATTERNS = ("plain", "striped", "dotted", "checked")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
SIZES = {"small": 0.22, "medium": 0.32, "large": 0.42}  # radius as a fraction of the smaller cell side
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
POSITIONS = tuple("centre" if (r, c) == ("middle", "middle") else f"{r} {c}" for r in ROWS for c in COLS)
WORDS = ("sun", "moon", "cat", "dog", "fish", "tree", "star", "box", "car", "cup", "hat", "key", "red", "sky",
         "map", "bus")
NUMBERS = tuple(str(n) for n in range(10, 100, 7))
MIN_CONTRAST = 150  # shapes differ from the background by at least this RGB distance


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, col) in the 3×3 grid
    cx: int
    cy: int
    r: int

    @property
    def position(self) -> str:
        return POSITIONS[3 * self.cell[0] + self.cell[1]]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    pattern: str
    shapes: tuple[Shape, ...]
    text: str | None = None  # a short word or number (OCR)
    text_cell: tuple[int, int] | None = None
    text_colour: str | None = None

    @property
    def text_position(self) -> str | None:
        return None if self.text_cell is None else POSITIONS[3 * self.text_cell[0] + self.text_cell[1]]

    def box(self, shape: Shape) -> tuple[int, int, int, int]:
        """Bounding box in InternVL's 0–1000 normalised coordinates: (x1, y1, x2, y2)."""
        w, h = self.width, self.height
        return (round(1000 * max(0, shape.cx - shape.r) / w), round(1000 * max(0, shape.cy - shape.r) / h),
                round(1000 * min(w, shape.cx + shape.r) / w), round(1000 * min(h, shape.cy + shape.r) / h))


@dataclass(frozen=True)
class Style:
    """How a scene is drawn. The default is the world's own look (benchmarks, held-out images); training images vary it
    so that a clean drawing made by another program is recognised too."""
    supersample: int = 1  # draw at this many times the size and downsample: anti-aliased edges
    outline: int = 0  # outline width in pixels (0: none)
    outline_black: bool = False  # a black outline, else a darker tone of the fill
    pure_white: bool = False  # a "white" background of (255, 255, 255) instead of the world's light grey
    tint: tuple[int, int, int] = (0, 0, 0)  # added to every fill colour (clamped): other programs' reds and blues


def sample_style(rng: random.Random) -> Style:
    """A random drawing style: in about half the images the world's own look, in the rest a mix of the variations."""
    if rng.random() < 0.5:
        return Style()
    return Style(supersample=rng.choice((1, 4)), outline=rng.choice((0, 0, 1, 2, 3)), outline_black=rng.random() < 0.5,
                 pure_white=rng.random() < 0.7, tint=tuple(rng.randint(-35, 35) for _ in range(3)))


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def shape_colours(background: str) -> list[str]:
    """Colours that stand out from `background`."""
    bg = BACKGROUNDS[background]
    return [c for c, rgb in COLOURS.items() if _distance(rgb, bg) >= MIN_CONTRAST]


def sample_scene(rng: random.Random, *, max_shapes: int = 4, text_prob: float = 0.3) -> Scene:
    """One to `max_shapes` shapes with distinct (colour, kind) in distinct cells; maybe a word or number."""
    width, height = rng.choice(IMAGE_SIZES)
    background, pattern = rng.choice(sorted(BACKGROUNDS)), rng.choice(PATTERNS)
    cells = [(r, c) for r in range(3) for c in range(3)]
    rng.shuffle(cells)
    cw, ch = width / 3, height / 3
    colours, shapes, used = shape_colours(background), [], set()
    for cell in cells[:rng.randint(1, max_shapes)]:
        kind, colour = rng.choice(SHAPES), rng.choice(colours)
        if (kind, colour) in used:
            continue
        used.add((kind, colour))
        size = rng.choice(sorted(SIZES))
        r = max(5, round(SIZES[size] * min(cw, ch)))
        slack_x, slack_y = max(0, int(cw / 2 - r) // 2), max(0, int(ch / 2 - r) // 2)
        cx = round((cell[1] + 0.5) * cw) + rng.randint(-slack_x, slack_x)
        cy = round((cell[0] + 0.5) * ch) + rng.randint(-slack_y, slack_y)
        shapes.append(Shape(kind, colour, size, cell, cx, cy, r))
    taken = {s.cell for s in shapes}
    free = [c for c in cells if c not in taken]
    if free and rng.random() < text_prob:
        text = rng.choice(WORDS) if rng.random() < 0.7 else rng.choice(NUMBERS)
        ink = "black" if sum(BACKGROUNDS[background]) > 380 else "white"
        return Scene(width, height, background, pattern, tuple(shapes), text, free[0], ink)
    return Scene(width, height, background, pattern, tuple(shapes))


def _pattern(draw: ImageDraw.ImageDraw, scene: Scene, base: tuple[int, int, int], k: int = 1) -> None:
    tone = tuple(max(0, min(255, v + (-22 if sum(base) > 380 else 22))) for v in base)
    w, h, step = k * scene.width, k * scene.height, k * 14
    if scene.pattern == "striped":
        for x in range(0, w, step):
            draw.rectangle((x, 0, x + step // 2 - 1, h), fill=tone)
    elif scene.pattern == "dotted":
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                draw.ellipse((x - 2 * k, y - 2 * k, x + 2 * k, y + 2 * k), fill=tone)
    elif scene.pattern == "checked":
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=tone)


def _star(cx: int, cy: int, r: int) -> list[tuple[float, float]]:
    return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.sin(math.pi * i / 5),
             cy - (r if i % 2 == 0 else 0.45 * r) * math.cos(math.pi * i / 5)) for i in range(10)]


def _shape(draw: ImageDraw.ImageDraw, s: Shape, k: int = 1, style: Style = Style()) -> None:
    """Draw `s` at `k` times the scene's size in `style`."""
    fill = tuple(max(0, min(255, v + t)) for v, t in zip(COLOURS[s.colour], style.tint))
    cx, cy, r = k * s.cx, k * s.cy, k * s.r
    line = {}
    if style.outline:
        ink = (0, 0, 0) if style.outline_black else tuple(v * 3 // 5 for v in fill)
        line = {"outline": ink, "width": k * style.outline}
    if s.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, **line)
    elif s.kind == "square":
        a = round(r * 0.85)
        draw.rectangle((cx - a, cy - a, cx + a, cy + a), fill=fill, **line)
    elif s.kind == "triangle":
        draw.regular_polygon((cx, cy, r), 3, fill=fill, **line)
    elif s.kind == "star":
        draw.polygon(_star(cx, cy, r), fill=fill, **line)
    elif s.kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, **line)
    elif s.kind == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, fill=fill, **line)
    elif s.kind == "cross":
        t = max(2 * k, r // 3)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {s.kind!r}; known: {', '.join(SHAPES)}")


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size)


def _text(draw: ImageDraw.ImageDraw, scene: Scene, k: int = 1) -> None:
    row, col = scene.text_cell
    cw, ch = scene.width / 3, scene.height / 3
    size = max(8, int(ch * 0.5))
    while size > 8 and _font(size).getlength(scene.text) > 0.95 * cw:
        size -= 1
    draw.text((k * (col + 0.5) * cw, k * (row + 0.5) * ch), scene.text, fill=COLOURS[scene.text_colour],
              font=_font(k * size), anchor="mm")


def render(scene: Scene, style: Style = Style()) -> Image.Image:
    """Draw `scene` as an RGB image of (scene.width, scene.height) in `style` (default: the world's own look)."""
    k = style.supersample
    base = (255, 255, 255) if style.pure_white and scene.background == "white" else BACKGROUNDS[scene.background]
    img = Image.new("RGB", (k * scene.width, k * scene.height), base)
    draw = ImageDraw.Draw(img)
    _pattern(draw, scene, base, k)
    for s in scene.shapes:
        _shape(draw, s, k, style)
    if scene.text is not None:
        _text(draw, scene, k)
    return img if k == 1 else img.resize((scene.width, scene.height), Image.Resampling.LANCZOS)


def b64(png: bytes) -> str:
    """PNG bytes as the base64 text of a VLMEvalKit TSV's image column."""
    return base64.b64encode(png).decode("ascii")


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding with no timestamps or metadata: the same image gives the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
