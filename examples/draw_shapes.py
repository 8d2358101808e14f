"""Draws examples/shapes.png with the synthetic world's renderer: a red circle, a green triangle and a blue square
on a plain white background, each in its own cell of the 3×3 grid, as the world's pictures are laid out."""
from pathlib import Path

from monovl.world.images import SIZES, Scene, Shape, render

W = H = 224
PARTS = (("circle", "red", (1, 0)), ("triangle", "green", (0, 1)), ("square", "blue", (1, 2)))  # (row, col) cells


def scene() -> Scene:
    r = round(SIZES["large"] * W / 3)
    shapes = tuple(Shape(kind, colour, "large", cell, round((cell[1] + 0.5) * W / 3), round((cell[0] + 0.5) * H / 3), r)
                   for kind, colour, cell in PARTS)
    return Scene(W, H, "white", "plain", shapes)


if __name__ == "__main__":
    render(scene()).save(Path(__file__).with_name("shapes.png"))
