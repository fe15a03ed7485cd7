"""The expert-load heatmap: a [rows x experts] matrix of load fractions -> a self-explanatory PIL image.

Pure rendering, no I/O and no process groups (`trainer/observe.py` gathers the counts and writes the
file). Each row is one MoE layer and sums to 1: the share of the step's routed token slots that went
to each expert, so a perfectly balanced layer is 1/E everywhere. Colours run from the matrix minimum
(dark) to its maximum (bright) on a viridis-like scale; the legend on the right gives both values and
marks 1/E. Drawn with Pillow's built-in font, so nothing beyond Pillow is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Viridis sampled at 9 evenly spaced points; colours in between are linearly interpolated.
_ANCHORS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
FONT_SIZE = 13
TICK_FONT_SIZE = 11


def colormap(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,))."""
    pos = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    return np.rint(_ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac).astype(np.uint8)


def normalize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Position of each value on the colour scale; a constant matrix sits mid-scale."""
    if vmax <= vmin:
        return np.full_like(values, 0.5, dtype=np.float64)
    return (values - vmin) / (vmax - vmin)


@dataclass(frozen=True)
class HeatmapLayout:
    """Pixel geometry of the plot: where the grid and the colour bar are."""

    num_rows: int
    num_experts: int
    cell_w: int
    cell_h: int
    grid_left: int
    grid_top: int
    bar_left: int
    bar_w: int
    width: int
    height: int

    @property
    def grid_h(self) -> int:
        return self.num_rows * self.cell_h

    @property
    def grid_w(self) -> int:
        return self.num_experts * self.cell_w

    def cell_box(self, row: int, expert: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a cell, right/bottom exclusive."""
        left, top = self.grid_left + expert * self.cell_w, self.grid_top + row * self.cell_h
        return left, top, left + self.cell_w, top + self.cell_h


def heatmap_layout(row_labels: Sequence[str], num_experts: int) -> HeatmapLayout:
    """Cells shrink as the matrix grows (down to 3x4 px, e.g. 61 layers x 256 experts) so the image
    stays around 1000 px wide; the grid starts right of the widest row label."""
    num_rows = len(row_labels)
    tick_font = ImageFont.load_default(size=TICK_FONT_SIZE)
    label_w = max(int(tick_font.getlength(s)) for s in [*row_labels, "layer"])
    cell_w = max(3, min(48, 720 // num_experts))
    cell_h = max(4, min(36, 480 // num_rows))
    grid_left, grid_top = label_w + 16, 64
    bar_left = grid_left + num_experts * cell_w + 24
    bar_w = 18
    width = bar_left + bar_w + 190  # room for the legend text
    height = grid_top + max(num_rows * cell_h, 140) + 48  # x ticks + axis title
    return HeatmapLayout(
        num_rows, num_experts, cell_w, cell_h, grid_left, grid_top, bar_left, bar_w, width, height
    )


def render_expert_load(frac_RE: np.ndarray, row_labels: Sequence[str], step: int) -> Image.Image:
    """Draw the load-fraction matrix `frac_RE` (rows = MoE layers labelled by `row_labels`, columns =
    experts 0..E-1) as an RGB image with title, axis labels and a colour legend."""
    frac_RE = np.asarray(frac_RE, dtype=np.float64)
    num_rows, num_experts = frac_RE.shape
    assert len(row_labels) == num_rows, (len(row_labels), num_rows)
    font, tick_font = ImageFont.load_default(size=FONT_SIZE), ImageFont.load_default(size=TICK_FONT_SIZE)
    lay = heatmap_layout(row_labels, num_experts)
    balanced = 1.0 / num_experts
    vmin, vmax = float(frac_RE.min()), float(frac_RE.max())
    title = f"Expert load at step {step}: share of routed tokens per expert"
    subtitle = f"{num_rows} MoE layers x {num_experts} experts, all ranks; balanced = 1/E = {balanced:.4f}"
    width = max(lay.width, int(font.getlength(title)) + 24, int(font.getlength(subtitle)) + 24)
    image = Image.new("RGB", (width, lay.height), BACKGROUND)

    # The grid: one solid block of colour per cell (numpy repeat, fast also for 61 x 256 cells).
    colours_RE3 = colormap(normalize(frac_RE, vmin, vmax))
    pixels = np.repeat(np.repeat(colours_RE3, lay.cell_h, axis=0), lay.cell_w, axis=1)
    image.paste(Image.fromarray(pixels, "RGB"), (lay.grid_left, lay.grid_top))

    draw = ImageDraw.Draw(image)
    draw.text((12, 8), title, fill=INK, font=font)
    draw.text((12, 8 + FONT_SIZE + 6), subtitle, fill=INK, font=tick_font)
    _annotate_cells(draw, lay, frac_RE, colours_RE3, tick_font)
    _axis_labels(draw, lay, row_labels, tick_font)
    _legend(draw, lay, vmin, vmax, balanced, tick_font)
    return image


def _every(slot_px: int, label_px: float) -> int:
    """Label every k-th row/column, k the smallest power of two at which labels do not overlap."""
    return 2 ** math.ceil(math.log2(max(1.0, (label_px + 3) / slot_px)))


def _annotate_cells(draw, lay: HeatmapLayout, frac_RE: np.ndarray, colours_RE3: np.ndarray, font) -> None:
    """Write each cell's value in it when cells are large enough to hold the text."""
    if lay.cell_w < 40 or lay.cell_h < 16:
        return
    for r in range(lay.num_rows):
        for e in range(lay.num_experts):
            left, top, right, bottom = lay.cell_box(r, e)
            text = f"{frac_RE[r, e]:.3f}".lstrip("0")
            luminance = colours_RE3[r, e] @ np.array([0.299, 0.587, 0.114])
            fill = INK if luminance > 128 else BACKGROUND
            draw.text(((left + right) / 2, (top + bottom) / 2), text, fill=fill, font=font, anchor="mm")


def _axis_labels(draw, lay: HeatmapLayout, row_labels: Sequence[str], font) -> None:
    grid_right, grid_bottom = lay.grid_left + lay.grid_w, lay.grid_top + lay.grid_h
    draw.rectangle((lay.grid_left - 1, lay.grid_top - 1, grid_right, grid_bottom), outline=INK)
    draw.text((lay.grid_left - 8, lay.grid_top - 6), "layer", fill=INK, font=font, anchor="rb")
    step = _every(lay.cell_h, TICK_FONT_SIZE)
    for r in range(0, lay.num_rows, step):
        y = lay.grid_top + r * lay.cell_h + lay.cell_h / 2
        draw.text((lay.grid_left - 6, y), row_labels[r], fill=INK, font=font, anchor="rm")
    step = _every(lay.cell_w, font.getlength(str(lay.num_experts - 1)))
    for e in range(0, lay.num_experts, step):
        x = lay.grid_left + e * lay.cell_w + lay.cell_w / 2
        draw.line((x, grid_bottom, x, grid_bottom + 3), fill=INK)
        draw.text((x, grid_bottom + 5), str(e), fill=INK, font=font, anchor="mt")
    centre = lay.grid_left + lay.grid_w / 2
    draw.text((centre, grid_bottom + 24), "expert", fill=INK, font=font, anchor="mt")


def _legend(draw, lay: HeatmapLayout, vmin: float, vmax: float, balanced: float, font) -> None:
    """Vertical colour bar (max at the top, min at the bottom) with 1/E marked."""
    top, height = lay.grid_top, max(lay.grid_h, 140)
    bar_right = lay.bar_left + lay.bar_w
    for y in range(height):
        t = 1.0 - y / max(height - 1, 1)
        draw.line((lay.bar_left, top + y, bar_right - 1, top + y), fill=tuple(colormap(t).tolist()))
    draw.rectangle((lay.bar_left - 1, top - 1, bar_right, top + height), outline=INK)
    text_x = bar_right + 6
    draw.text((text_x, top), f"max {vmax:.4f}", fill=INK, font=font, anchor="lt")
    draw.text((text_x, top + height), f"min {vmin:.4f}", fill=INK, font=font, anchor="lb")
    t = float(normalize(np.array(balanced), vmin, vmax))
    if 0.0 <= t <= 1.0:
        y = top + (1.0 - t) * (height - 1)
        draw.line((lay.bar_left - 4, y, bar_right + 3, y), fill=INK, width=2)
        draw.text((text_x, y), f"1/E {balanced:.4f} balanced", fill=INK, font=font, anchor="lm")
    draw.text((lay.bar_left, top - 6), "share of tokens", fill=INK, font=font, anchor="lb")
