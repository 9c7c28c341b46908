"""Slice pictures and the per-slice curve for the report (PNG as base64 data URIs, inline SVG)."""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ..types import LESION_CONSOLIDATION, LESION_GGO

# overlay colours (RGB): lung contour green, ground-glass yellow, consolidation red
_LUNG_RGB = np.array([40, 220, 90], np.float32)
_GGO_RGB = np.array([255, 210, 0], np.float32)
_CONS_RGB = np.array([255, 40, 40], np.float32)


def window_to_uint8(hu_slice: np.ndarray, center: float = -600.0, width: float = 1500.0) -> np.ndarray:
    lo = center - width / 2.0
    return (np.clip((hu_slice.astype(np.float32) - lo) / width, 0.0, 1.0) * 255.0).astype(np.uint8)


def overlay_slice(hu_slice: np.ndarray, lung_slice: np.ndarray | None, lesion_slice: np.ndarray | None,
                  *, alpha: float = 0.45, aspect: float = 1.0, max_size: int = 256) -> np.ndarray:
    """RGB uint8 picture: lung window, lung contour, lesions filled (GGO yellow, consolidation red).

    aspect: row spacing / column spacing, so non-square pixels are drawn at their true shape.
    """
    grey = window_to_uint8(hu_slice).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if lesion_slice is not None:
        for label, colour in ((LESION_GGO, _GGO_RGB), (LESION_CONSOLIDATION, _CONS_RGB)):
            m = lesion_slice == label
            if m.any():
                rgb[m] = (1 - alpha) * rgb[m] + alpha * colour
    if lung_slice is not None and lung_slice.any():
        lung = lung_slice > 0
        contour = lung & ~ndi.binary_erosion(lung, iterations=2)
        rgb[contour] = _LUNG_RGB
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    h, w = hu_slice.shape
    scale = max_size / max(h * aspect, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * aspect * scale))))
    return np.asarray(img.resize(size, Image.BILINEAR))


def png_data_uri(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)  # fast encode; files ~20 % larger
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def curve_svg(values: list[float], *, marks: list[int] | None = None, width: int = 720, height: int = 180,
              y_label: str = "lesion probability", x_label: str = "slice index (superior → inferior)",
              y_max: float | None = None) -> str:
    """A small self-contained SVG line chart of a per-slice value; ``marks`` are slice indices to tick."""
    n = len(values)
    pad_l, pad_r, pad_t, pad_b = 48, 12, 12, 32
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    vmax = y_max if y_max is not None else max([1e-9] + [float(v) for v in values])
    def xy(i: int, v: float) -> tuple[float, float]:
        x = pad_l + (plot_w * i / max(n - 1, 1))
        y = pad_t + plot_h * (1.0 - min(float(v), vmax) / vmax)
        return x, y
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(values)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{y_label} per slice">',
             f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):
        y = pad_t + plot_h * (1 - frac)
        parts.append(f'<text x="{pad_l - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{vmax * frac:.2g}</text>')
    for i in marks or []:
        x, _ = xy(i, 0)
        parts.append(f'<line x1="{x:.1f}" y1="{pad_t}" x2="{x:.1f}" y2="{pad_t + plot_h}" stroke="#ccd" '
                     f'stroke-dasharray="2,3"/>')
    if n:
        parts.append(f'<polyline fill="none" stroke="#c0392b" stroke-width="1.5" points="{pts}"/>')
    parts.append(f'<text x="{pad_l + plot_w / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">'
                 f'{x_label} (0–{max(n - 1, 0)})</text>')
    parts.append(f'<text x="12" y="{pad_t + plot_h / 2:.0f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {pad_t + plot_h / 2:.0f})">{y_label}</text>')
    parts.append("</svg>")
    return "".join(parts)
