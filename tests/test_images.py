"""Tests for monovl.images: loading, mode conversion, errors, InternVL grid choice and tiling."""

import random
import struct
import warnings
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from monovl.images import (IMAGENET_MEAN, IMAGENET_STD, ImageError, dynamic_preprocess,
                           find_closest_aspect_ratio, load_image, load_pixel_values,
                           target_ratios, tiles_to_tensor)
from pictures import png

BICUBIC = Image.Resampling.BICUBIC


# ---------------------------------------------------------------- grid choice


def brute_force_grid(w, h, min_tiles, max_tiles, image_size):
    """The sequential InternVL rule, restated: among the grids closest in ratio, listed by
    ascending area, the first is kept unless a later one has the image cover more than half
    of its pixels; the last such later one wins."""
    grids = [(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)
             if min_tiles <= i * j <= max_tiles]
    diff = {g: abs(w / h - g[0] / g[1]) for g in grids}
    best = min(diff.values())
    tied = sorted((g for g in grids if diff[g] == best), key=lambda g: (g[0] * g[1], g))
    later = [g for g in tied[1:] if w * h > 0.5 * image_size**2 * g[0] * g[1]]
    return later[-1] if later else tied[0]


def _sizes(min_tiles, max_tiles):
    sizes = [(448, 448), (896, 448), (1344, 448), (448, 896), (100, 100), (2000, 1000),
             (1000, 2000), (1, 5000), (5000, 1), (1, 1), (640, 480), (1920, 1080), (800, 600)]
    # exact ties: the image ratio equal to a grid ratio, or at the midpoint of two neighbouring
    # grid ratios, at scales on both sides of the area condition
    ratios = sorted({Fraction(i, j) for i, j in target_ratios(min_tiles, max_tiles)})
    for r in ratios + [(a + b) / 2 for a, b in zip(ratios, ratios[1:])]:
        sizes += [(r.numerator * k, r.denominator * k) for k in (1, 37, 150, 600)]
    rng = random.Random(0)
    sizes += [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(150)]
    return sizes


SETTINGS = [(1, 6), (1, 12), (2, 12), (4, 4), (3, 9)]


@pytest.mark.parametrize("min_tiles,max_tiles", SETTINGS)
def test_grid_matches_brute_force(min_tiles, max_tiles):
    sizes = _sizes(min_tiles, max_tiles)
    assert len(sizes) > 150
    ratios = target_ratios(min_tiles, max_tiles)
    for w, h in sizes:
        got = find_closest_aspect_ratio(w / h, ratios, w, h, 448)
        assert got == brute_force_grid(w, h, min_tiles, max_tiles, 448), (w, h)


@pytest.mark.parametrize("min_tiles,max_tiles", [(1, 6), (1, 12), (2, 12), (1, 24)])
def test_grid_independent_of_equal_area_order(min_tiles, max_tiles):
    # the official code orders equal-area grids by set iteration; for these ranges it cannot matter
    by_area_only = sorted(set(target_ratios(min_tiles, max_tiles)), key=lambda g: g[0] * g[1])
    ours = target_ratios(min_tiles, max_tiles)
    for w, h in _sizes(min_tiles, max_tiles):
        assert (find_closest_aspect_ratio(w / h, by_area_only, w, h, 448)
                == find_closest_aspect_ratio(w / h, ours, w, h, 448)), (w, h)


def test_known_grids():
    r = target_ratios(1, 12)
    assert find_closest_aspect_ratio(1.0, r, 448, 448, 448) == (1, 1)
    assert find_closest_aspect_ratio(1.0, r, 2000, 2000, 448) == (3, 3)  # tie: larger grid
    assert find_closest_aspect_ratio(2.0, r, 896, 448, 448) == (2, 1)
    assert find_closest_aspect_ratio(2.0, r, 2000, 1000, 448) == (4, 2)
    assert find_closest_aspect_ratio(3.0, r, 1344, 448, 448) == (3, 1)


@pytest.mark.parametrize("w,h,s,min_tiles,max_tiles,smaller,larger", [
    (279, 248, 186, 1, 6, (1, 1), (2, 2)),  # ratio 1.125: (1,1) and (2,2) tie
    (392, 200, 140, 1, 12, (2, 1), (4, 2)),  # ratio 1.96: (2,1) and (4,2) tie
])
def test_area_condition_is_strict(w, h, s, min_tiles, max_tiles, smaller, larger):
    assert 2 * w * h == s * s * larger[0] * larger[1]  # exactly half of the larger grid's pixels
    r = target_ratios(min_tiles, max_tiles)
    assert find_closest_aspect_ratio(w / h, r, w, h, s) == smaller
    assert find_closest_aspect_ratio(w / h, r, w, h - 1, s) == smaller  # one row fewer
    assert find_closest_aspect_ratio(w / h, r, w + 1, h, s) == larger  # one column more
    assert brute_force_grid(w, h, min_tiles, max_tiles, s) == smaller


def test_target_ratios():
    r = target_ratios(2, 6)
    assert set(r) == {(i, j) for i in range(1, 7) for j in range(1, 7) if 2 <= i * j <= 6}
    assert [i * j for i, j in r] == sorted(i * j for i, j in r)
    with pytest.raises(ValueError):
        target_ratios(3, 2)


# ---------------------------------------------------------------- tiling and tensors


def _noise(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_dynamic_preprocess_tiles_are_crops_of_resized_image():
    s = 28
    img = _noise(100, 50)
    tiles = dynamic_preprocess(img, max_tiles=12, image_size=s)
    cols, rows = find_closest_aspect_ratio(2.0, target_ratios(1, 12), 100, 50, s)
    assert (cols, rows) == (4, 2)  # ties with (2, 1); 100*50 > 0.5 * 28**2 * 8
    assert len(tiles) == cols * rows + 1
    assert all(t.size == (s, s) and t.mode == "RGB" for t in tiles)
    resized = img.resize((cols * s, rows * s), BICUBIC)
    for k in range(cols * rows):
        x, y = (k % cols) * s, (k // cols) * s
        assert tiles[k].tobytes() == resized.crop((x, y, x + s, y + s)).tobytes(), k
    assert tiles[-1].tobytes() == img.resize((s, s), BICUBIC).tobytes()
    assert len(dynamic_preprocess(img, max_tiles=12, image_size=s, use_thumbnail=False)) == 8
    assert len(dynamic_preprocess(img, max_tiles=6, image_size=s)) == 3  # (2, 1) + thumbnail


def test_single_tile_has_no_thumbnail():
    tiles = dynamic_preprocess(_noise(30, 30), image_size=28)
    assert len(tiles) == 1 and tiles[0].size == (28, 28)


def test_tiles_to_tensor_normalisation():
    color = (10, 200, 255)
    t = tiles_to_tensor([Image.new("RGB", (28, 28), color), Image.new("RGB", (5, 9), color)], 28)
    assert t.shape == (2, 3, 28, 28) and t.dtype == torch.float32
    for c in range(3):
        v = torch.tensor(color[c], dtype=torch.float32) / 255
        expected = (v - torch.tensor(IMAGENET_MEAN[c])) / torch.tensor(IMAGENET_STD[c])
        assert torch.equal(t[:, c], expected.expand(2, 28, 28))
    with pytest.raises(ImageError, match="RGB"):
        tiles_to_tensor([Image.new("L", (28, 28))], 28)


@pytest.mark.parametrize("w,h,grid", [(1, 5000, (1, 12)), (5000, 1, (12, 1))])
def test_extreme_aspect_ratios(w, h, grid):
    data = png((w, h), (50, 100, 150))
    s = 28
    assert find_closest_aspect_ratio(w / h, target_ratios(1, 12), w, h, s) == grid
    pv = load_pixel_values(data, image_size=s)
    assert pv.shape == (13, 3, s, s) and torch.isfinite(pv).all()
    assert load_pixel_values(data, image_size=s, max_tiles=6).shape == (7, 3, s, s)


def test_load_pixel_values_not_dynamic(tmp_path):
    path = tmp_path / "a.png"
    _noise(100, 40).save(path)
    assert load_pixel_values(path, image_size=56, dynamic=False).shape == (1, 3, 56, 56)
    # ratio 2.5 ties (2, 1) and (3, 1); 100*40 <= 0.5 * 56**2 * 3 keeps (2, 1)
    assert load_pixel_values(str(path), image_size=56, max_tiles=4).shape == (3, 3, 56, 56)


# ---------------------------------------------------------------- modes


def _roundtrip(tmp_path, img, fmt, **kw):
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, fmt, **kw)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == img.size
    return out


def test_rgb_png_and_sources(tmp_path):
    img = _noise(16, 8)
    out = _roundtrip(tmp_path, img, "PNG")
    assert out.tobytes() == img.tobytes()
    assert load_image(img).tobytes() == img.tobytes()
    with open(tmp_path / "img.png", "rb") as f:
        assert load_image(f).tobytes() == img.tobytes()
    assert load_image((tmp_path / "img.png").read_bytes()).tobytes() == img.tobytes()


def test_rgb_jpeg(tmp_path):
    out = _roundtrip(tmp_path, Image.new("RGB", (16, 16), (200, 30, 60)), "JPEG", quality=95)
    assert np.abs(np.asarray(out, dtype=int) - (200, 30, 60)).max() <= 3


def test_rgba_transparent_becomes_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    out = _roundtrip(tmp_path, img, "PNG")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((2, 0)))


def test_la(tmp_path):
    img = Image.new("LA", (2, 1))
    img.putdata([(0, 0), (100, 255)])
    out = _roundtrip(tmp_path, img, "PNG")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (100, 100, 100)


def _palette_image():
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    img.putdata([0, 1, 2])
    return img


def test_p(tmp_path):
    out = _roundtrip(tmp_path, _palette_image(), "PNG")
    assert list(out.get_flattened_data()) == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_p_with_transparency(tmp_path):
    out = _roundtrip(tmp_path, _palette_image(), "PNG", transparency=1)
    assert list(out.get_flattened_data()) == [(255, 0, 0), (255, 255, 255), (0, 0, 255)]


def test_l_and_1(tmp_path):
    assert _roundtrip(tmp_path, Image.new("L", (4, 4), 77), "PNG").getpixel((1, 1)) == (77, 77, 77)
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    out = _roundtrip(tmp_path, one, "PNG")
    assert list(out.get_flattened_data()) == [(0, 0, 0), (255, 255, 255)]


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (2, 1))
    img.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])
    out = _roundtrip(tmp_path, img, "TIFF")
    assert list(out.get_flattened_data()) == [(255, 255, 255), (0, 255, 255)]
    out = _roundtrip(tmp_path, Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=95)
    assert np.asarray(out).min() >= 250
    ycc = load_image(Image.new("RGB", (2, 2), (10, 120, 240)).convert("YCbCr"))
    assert all(abs(a - b) <= 3 for a, b in zip(ycc.getpixel((0, 0)), (10, 120, 240)))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit(tmp_path, fmt):
    img = Image.new("I;16", (3, 1))
    for x, v in enumerate([65535, 0, 32896]):
        img.putpixel((x, 0), v)
    out = _roundtrip(tmp_path, img, fmt)
    assert [p[0] for p in out.get_flattened_data()] == [255, 0, 128]
    assert all(p[0] == p[1] == p[2] for p in out.get_flattened_data())


def test_int32_and_float(tmp_path):
    img = Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.int32))
    assert img.mode == "I"
    assert [p[0] for p in _roundtrip(tmp_path, img, "TIFF").get_flattened_data()] == [0, 255, 128]
    wide = Image.fromarray(np.array([[-100, 131070, 65485]], dtype=np.int32))
    # outside 0..65535: min..max stretched
    assert [p[0] for p in load_image(wide).get_flattened_data()] == [0, 255, 128]
    f = Image.fromarray(np.array([[0.0, 99.6, 255.0]], dtype=np.float32))
    assert [p[0] for p in _roundtrip(tmp_path, f, "TIFF").get_flattened_data()] == [0, 100, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32) * 1000 - 500)
    assert [p[0] for p in load_image(f).get_flattened_data()] == [0, 128, 255]


def test_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "o.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


# ---------------------------------------------------------------- errors


def _png_with_size(w, h):
    data = bytearray(png((4, 4), (1, 2, 3)))
    data[16:24] = struct.pack(">II", w, h)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type + IHDR data
    return bytes(data)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found") as e:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(e.value)


def test_text_file_and_empty(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not an image\n" * 10)
    with pytest.raises(ImageError, match="not an image") as e:
        load_image(path)
    assert "notes.txt" in str(e.value)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "zero.png")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    _noise(64, 64).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as e:
        load_image(path)
    assert path.name in str(e.value)


def test_decompression_bomb_headers():
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(_png_with_size(100_000, 100_000))  # over Pillow's hard limit
    with pytest.raises(ImageError, match="80000000 pixels exceeds max_pixels=64000000"):
        load_image(_png_with_size(10_000, 8_000))  # under Pillow's limits, over ours
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's bomb warning must not leak
        with pytest.raises(ImageError, match="90000000 pixels exceeds max_pixels=1000000"):
            load_image(_png_with_size(10_000, 9_000), max_pixels=1_000_000)
        with pytest.raises(ImageError, match="truncated or corrupt"):  # allowed size, no data
            load_image(_png_with_size(10_000, 9_000), max_pixels=100_000_000)


def test_max_pixels_on_real_image(tmp_path):
    path = tmp_path / "real.png"
    _noise(64, 64).save(path)
    with pytest.raises(ImageError, match="4096 pixels exceeds max_pixels=1000"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=4096).size == (64, 64)


def test_zero_size():
    with pytest.raises(ImageError, match="zero-size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="zero-size"):
        dynamic_preprocess(Image.new("RGB", (5, 0)))
    with pytest.raises(ImageError):
        load_image(_png_with_size(0, 4))  # Pillow refuses a zero-width PNG header
