"""Tile PNG images into one grid image, row by row, e.g. for a bundle README's sample figure.

Usage::

    python tools/make_image_grid.py --images "OUT/a_*.png,OUT/b_*.png" --columns 4 --output docs/samples.png

``--images`` takes comma-separated paths or glob patterns; each pattern's matches are sorted. All
images must have the same size and mode. The grid is written to a temporary name, then renamed.
"""

from __future__ import annotations

import glob
from pathlib import Path

import fire
from PIL import Image

from common.io.atomic import atomic_path


def make_image_grid(images: str | list[str], columns: int, output: str, padding: int = 2, scale: int = 1) -> str:
    """Write the grid of ``images`` with ``columns`` per row to ``output``; returns the output path.

    ``scale`` enlarges every tile by an integer factor (nearest neighbour), for small demo images.
    """
    patterns = images.split(",") if isinstance(images, str) else list(images)
    paths = [p for pattern in patterns for p in (sorted(glob.glob(pattern)) or [pattern])]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"Images not found: {missing}")
    tiles = [Image.open(p) for p in paths]
    if scale > 1:
        tiles = [t.resize((t.width * scale, t.height * scale), Image.Resampling.NEAREST) for t in tiles]
    sizes = {t.size for t in tiles}
    if len(sizes) != 1:
        raise SystemExit(f"Images differ in size {sorted(sizes)}; give images of one size.")
    (w, h), rows = tiles[0].size, -(-len(tiles) // columns)
    grid = Image.new(tiles[0].mode, (columns * w + (columns - 1) * padding, rows * h + (rows - 1) * padding))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * (w + padding), (i // columns) * (h + padding)))
    with atomic_path(output) as tmp:
        grid.save(tmp)
    return output


def cli() -> None:
    """Entry point of ``make-image-grid``."""
    fire.Fire(make_image_grid)


if __name__ == "__main__":
    cli()
