"""Small RGB images for TensorBoard (``SummaryWriter.add_image(..., dataformats="HWC")``).

Drawn with numpy; labels with Pillow, which ``tensorboard`` itself depends on (no matplotlib).
Every function returns an ``[H, W, 3]`` ``uint8`` array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Viridis-like colour ramp: dark purple (0) -> teal -> yellow (1).
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
_SERIES_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
_FONT = ImageFont.load_default()


def ramp_colour(values: np.ndarray) -> np.ndarray:
    """Colours [..., 3] (uint8) of ``values`` in [0, 1] on the viridis-like ramp (NaN -> light grey)."""
    values = np.asarray(values, dtype=np.float64)
    position = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    weight = (position - low)[..., None]
    colours = _RAMP[low] * (1 - weight) + _RAMP[low + 1] * weight
    colours[np.isnan(values)] = 230
    return colours.round().astype(np.uint8)


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_FONT)
    return right - left, bottom - top


def heatmap(
    colour_values: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    cell_text: Sequence[Sequence[str]] | None = None,
    marked: Sequence[tuple[int, int]] = (),
    title: str = "",
) -> np.ndarray:
    """A labelled heatmap: cell (i, j) coloured by ``colour_values[i, j]`` in [0, 1], optional
    text in each cell, and a white frame around the ``marked`` cells."""
    rows, columns = colour_values.shape
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max([_text_size(probe, label)[0] for label in row_labels] + [0]) + 10
    cell_width = max([_text_size(probe, label)[0] for label in column_labels] + [28]) + 10
    if cell_text is not None:
        cell_width = max([cell_width] + [_text_size(probe, t)[0] + 10 for row in cell_text for t in row])
    cell_height, top = 22, 22 + (16 if title else 0)
    width, height = label_width + columns * cell_width + 2, top + rows * cell_height + 2
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    colours = ramp_colour(colour_values)  # [rows, columns, 3]
    for i in range(rows):
        for j in range(columns):
            y, x = top + i * cell_height, label_width + j * cell_width
            image[y + 1 : y + cell_height, x + 1 : x + cell_width] = colours[i, j]
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=_FONT)
    for j, label in enumerate(column_labels):
        draw.text((label_width + j * cell_width + 5, top - 17), label, fill=(0, 0, 0), font=_FONT)
    for i, label in enumerate(row_labels):
        draw.text((4, top + i * cell_height + 5), label, fill=(0, 0, 0), font=_FONT)
    if cell_text is not None:
        for i in range(rows):
            for j in range(columns):
                luminance = colours[i, j] @ np.array([0.299, 0.587, 0.114])
                ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
                draw.text((label_width + j * cell_width + 5, top + i * cell_height + 5), cell_text[i][j], fill=ink, font=_FONT)
    for i, j in marked:
        x, y = label_width + j * cell_width, top + i * cell_height
        draw.rectangle([x + 1, y + 1, x + cell_width - 1, y + cell_height - 1], outline=(255, 255, 255), width=2)
        draw.rectangle([x, y, x + cell_width, y + cell_height], outline=(0, 0, 0), width=1)
    return np.asarray(canvas, dtype=np.uint8)


def grouped_bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    heights: dict[str, Sequence[float]],
    title: str = "",
) -> np.ndarray:
    """A grouped bar chart: one group per entry of ``groups``, one bar per series; a bar's height
    is ``heights[name][g]`` in [0, 1] and its label ``series[name][g]`` (the raw value)."""
    names = list(series)
    bar, gap, plot_height = 28, 14, 140
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    group_width = max(len(names) * bar, max([_text_size(probe, g)[0] for g in groups] + [0])) + gap
    top, left = 34 + (16 if title else 0), 8
    width = max(left + len(groups) * group_width + 8, 260)
    height = top + plot_height + 22
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=_FONT)
    legend_x = 4
    for s, name in enumerate(names):  # legend
        colour = _SERIES_COLOURS[s % len(_SERIES_COLOURS)]
        draw.rectangle([legend_x, top - 30, legend_x + 10, top - 20], fill=colour)
        draw.text((legend_x + 14, top - 31), name, fill=(0, 0, 0), font=_FONT)
        legend_x += 24 + _text_size(draw, name)[0]
    baseline = top + plot_height
    draw.line([left, baseline, width - 4, baseline], fill=(0, 0, 0))
    for g, group in enumerate(groups):
        x0 = left + g * group_width
        for s, name in enumerate(names):
            fraction = float(np.clip(np.nan_to_num(heights[name][g]), 0.0, 1.0))
            x = x0 + s * bar
            y = baseline - round(fraction * (plot_height - 14))
            draw.rectangle([x + 2, y, x + bar - 2, baseline], fill=_SERIES_COLOURS[s % len(_SERIES_COLOURS)])
            value = series[name][g]
            label = f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"
            draw.text((x + 1, y - 12), label, fill=(0, 0, 0), font=_FONT)
        draw.text((x0 + 2, baseline + 5), group, fill=(0, 0, 0), font=_FONT)
    return np.asarray(canvas, dtype=np.uint8)
