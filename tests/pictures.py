"""Test pictures of one colour: PNG bytes, as base64 text (a benchmark TSV's image column) or as a data URL."""
from PIL import Image

from monovl.world.images import b64, png_bytes

RED = (200, 30, 30)
__all__ = ["RED", "b64", "data_url", "png"]


def png(size=(60, 40), color=RED, mode="RGB") -> bytes:
    """PNG bytes of a (w, h) = `size` image filled with `color`."""
    return png_bytes(Image.new(mode, size, color))


def data_url(data: bytes) -> str:
    """Image bytes as the `image_url` of a chat message."""
    return "data:image/png;base64," + b64(data)
