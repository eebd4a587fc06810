"""A small line chart written with Pillow (no plotting library needed): accuracy against visual
tokens per decoder layer, one line per pruning policy, the unpruned model as a dashed line."""
from __future__ import annotations

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    step = (hi - lo) / n
    mag = 10 ** len(str(int(step))) / 10 if step >= 1 else 0.1
    step = max(mag, round(step / mag) * mag)
    start = (lo // step) * step
    return [start + i * step for i in range(n + 2) if start + i * step <= hi + 1e-9]


def line_chart(series: dict, path: str, title: str, xlabel: str, ylabel: str, hline: tuple | None = None,
               size=(900, 560)) -> str:
    """series {name: [(x, y), ...]}; hline (label, y). Writes a PNG to `path`."""
    W, H = size
    left, right, top, bottom = 80, 210, 50, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [x for pts in series.values() for x, _ in pts] or [0, 1]
    ys = [y for pts in series.values() for _, y in pts] + ([hline[1]] if hline else []) or [0, 1]
    x0, x1 = 0.0, max(xs) * 1.05
    y0, y1 = max(0.0, min(ys) - 5), min(100.0, max(ys) + 3)
    sx = (lambda x: left + (x - x0) / (x1 - x0 or 1) * (W - left - right))
    sy = (lambda y: H - bottom - (y - y0) / (y1 - y0 or 1) * (H - top - bottom))
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in _ticks(x0, x1):
        d.line([sx(t), H - bottom, sx(t), H - bottom + 5], fill="black")
        d.text((sx(t) - 10, H - bottom + 8), f"{t:g}", fill="black")
    for t in _ticks(y0, y1):
        if y0 <= t <= y1:
            d.line([left - 5, sy(t), left, sy(t)], fill="black")
            d.line([left, sy(t), W - right, sy(t)], fill=(230, 230, 230))
            d.text((left - 40, sy(t) - 6), f"{t:g}", fill="black")
    d.text((W // 2 - 4 * len(title), 15), title, fill="black")
    d.text(((left + W - right) // 2 - 3 * len(xlabel), H - 25), xlabel, fill="black")
    d.text((8, top - 25), ylabel, fill="black")
    legend_y = top + 10
    if hline:
        y = sy(hline[1])
        for x in range(left, W - right, 12):
            d.line([x, y, min(x + 6, W - right), y], fill="black", width=2)
        d.line([W - right + 15, legend_y + 6, W - right + 40, legend_y + 6], fill="black", width=2)
        d.text((W - right + 45, legend_y), hline[0], fill="black")
        legend_y += 20
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = sorted(pts)
        if len(pts) > 1:
            d.line([(sx(x), sy(y)) for x, y in pts], fill=colour, width=3)
        for x, y in pts:
            d.ellipse([sx(x) - 4, sy(y) - 4, sx(x) + 4, sy(y) + 4], fill=colour)
        d.line([W - right + 15, legend_y + 6, W - right + 40, legend_y + 6], fill=colour, width=3)
        d.text((W - right + 45, legend_y), name, fill="black")
        legend_y += 20
    img.save(path)
    return path
