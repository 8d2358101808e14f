"""Image loading and InternVL dynamic tiling: file/bytes/PIL image -> pixel_values (N, 3, S, S)."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = Image.Resampling.BICUBIC
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)

ImageSource = str | Path | bytes | bytearray | BinaryIO | Image.Image


class ImageError(ValueError):
    """An image that cannot be used: missing, not an image, too large, empty, corrupt."""


def load_image(src: ImageSource, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Open `src`, check its header size, decode fully, apply EXIF orientation, return RGB."""
    name, img = _open(src)
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"{name}: zero-size image ({w}x{h})")
        if w * h > max_pixels:
            raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} "
                             "(possible decompression bomb)")
        try:
            img.load()  # full decode now, so a truncated file fails here instead of decoding grey
            oriented = ImageOps.exif_transpose(img)  # a new image, upright per EXIF Orientation
        except _DECODE_ERRORS as e:
            raise ImageError(f"{name}: truncated or corrupt image ({e})") from e
    finally:
        if img is not src:
            img.close()
    try:
        return _to_rgb(oriented)
    except ValueError as e:
        raise ImageError(f"{name}: unsupported image mode {oriented.mode!r} ({e})") from e


def _open(src: ImageSource) -> tuple[str, Image.Image]:
    """Return (name for messages, lazily opened image); only the header is read."""
    if isinstance(src, Image.Image):
        return "<PIL image>", src
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.exists():
            raise ImageError(f"{path}: image file not found")
        if not path.is_file():
            raise ImageError(f"{path}: not a regular file")
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty image file (0 bytes)")
        name, fp = str(path), path
    elif isinstance(src, (bytes, bytearray)):
        if not src:
            raise ImageError("<bytes>: empty image data (0 bytes)")
        name, fp = "<bytes>", io.BytesIO(src)
    elif hasattr(src, "read"):
        name, fp = str(getattr(src, "name", "<file object>")), src
    else:
        raise ImageError(f"cannot load an image from {type(src).__name__}")
    try:
        with warnings.catch_warnings():
            # Pillow's global soft limit is superseded by our own max_pixels check on the header.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return name, Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: decompression bomb rejected by Pillow: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image or unidentified image format") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name}: truncated or corrupt image header ({e})") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (transparency over white, high bit depths rescaled)."""
    mode = img.mode
    if mode in ("RGBA", "LA", "PA") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        # alpha (or a transparent palette/colour key) is composited over an opaque white background
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    if mode == "RGB":
        return img  # already RGB
    if mode.startswith("I;16"):
        return _rescale(np.asarray(img), 65535)  # 16-bit: value / 257, rounded
    if mode == "I":
        return _rescale(np.asarray(img), 65535)  # int32: 16-bit if in 0..65535, else min..max
    if mode == "F":
        return _rescale(np.nan_to_num(np.asarray(img)), 255)  # float: kept in 0..255, else min..max
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV: Pillow's own conversion


def _rescale(a: np.ndarray, full: int) -> Image.Image:
    """Map 0..full to 0..255; data outside 0..full is stretched from its min..max instead."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= full:
        v = a * (255 / full)
    else:
        v = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    gray = np.clip(np.round(v), 0, 255).astype(np.uint8)  # (H, W)
    return Image.fromarray(gray).convert("RGB")


def target_ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All grids (cols, rows) with min_tiles <= cols*rows <= max_tiles, sorted by (area, cols, rows)."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = {(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)
             if min_tiles <= i * j <= max_tiles}
    # The official code sorts a set by area only, so equal-area grids come in set-iteration order.
    # That order only matters when two equal-area grids tie in |ratio difference| (one on each side
    # of the image ratio) and that tie is the best; checked exhaustively for max_tiles <= 48, this
    # happens only for narrow ranges with min_tiles >= 4 (e.g. 4..4), never for 1..N or 2..N.
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0], g[1]))


def find_closest_aspect_ratio(aspect_ratio: float, target_ratios: list[tuple[int, int]],
                              width: int, height: int, image_size: int) -> tuple[int, int]:
    """InternVL's rule: closest cols/rows ratio; on a tie the later (larger) grid wins if the
    image has more than half of that grid's pixels."""
    best, best_diff = (1, 1), math.inf
    for i, j in target_ratios:
        diff = abs(aspect_ratio - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def dynamic_preprocess(image: Image.Image, *, min_tiles: int = 1, max_tiles: int = 12,
                       image_size: int = 448, use_thumbnail: bool = True) -> list[Image.Image]:
    """Resize to the best (cols*S, rows*S) grid and cut row-major tiles (+ a thumbnail if > 1)."""
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"zero-size image ({w}x{h})")
    cols, rows = find_closest_aspect_ratio(w / h, target_ratios(min_tiles, max_tiles), w, h, image_size)
    s = image_size
    resized = image.resize((cols * s, rows * s), BICUBIC)
    boxes = [((k % cols) * s, (k // cols) * s) for k in range(cols * rows)]  # row-major (x, y)
    tiles = [resized.crop((x, y, x + s, y + s)) for x, y in boxes]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((s, s), BICUBIC))
    return tiles


def tiles_to_tensor(tiles: list[Image.Image], image_size: int) -> torch.Tensor:
    """RGB tiles -> ImageNet-normalised float32 pixel_values (N, 3, S, S)."""
    if not tiles:
        raise ImageError("no tiles to convert")
    s = image_size
    arrays = []
    for tile in tiles:
        if tile.mode != "RGB":
            raise ImageError(f"tiles must be RGB, got mode {tile.mode!r}")
        if tile.size != (s, s):
            tile = tile.resize((s, s), BICUBIC)
        arrays.append(np.asarray(tile, dtype=np.uint8))  # (S, S, 3)
    x = torch.from_numpy(np.stack(arrays))  # (N, S, S, 3) uint8
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255)  # (N, 3, S, S) in [0, 1]
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()  # (N, 3, S, S)


def load_pixel_values(src: ImageSource, *, image_size: int = 448, max_tiles: int = 12,
                      min_tiles: int = 1, use_thumbnail: bool = True, dynamic: bool = True,
                      max_pixels: int = 64_000_000) -> torch.Tensor:
    """load_image -> tiles (dynamic grid, or one resized tile) -> pixel_values (N, 3, S, S)."""
    image = load_image(src, max_pixels=max_pixels)
    if dynamic:
        tiles = dynamic_preprocess(image, min_tiles=min_tiles, max_tiles=max_tiles,
                                   image_size=image_size, use_thumbnail=use_thumbnail)
    else:
        tiles = [image.resize((image_size, image_size), BICUBIC)]
    return tiles_to_tensor(tiles, image_size)
