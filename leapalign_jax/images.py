"""Image files: PNGs and captioned grids from ``[-1, 1]`` NHWC arrays.

Grids caption every image (its prompt, a verdict) in PIL's default font,
so no font file is needed. Called on process 0.
"""

from __future__ import annotations

import io
import math
import os
import tempfile

import numpy as np
from PIL import Image


def to_uint8(images_BHWC: np.ndarray) -> np.ndarray:
  """``[-1, 1]`` floats -> uint8 (clipped, rounded)."""
  x = (np.asarray(images_BHWC, np.float32) + 1.0) * 127.5
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def save_png(image_HWC: np.ndarray, path: str, scale: int = 1) -> str:
  """Writes a uint8 image atomically; ``scale`` upsamples (nearest) tiny ones.

  ``path`` may be a ``gs://`` URL (one object write, see ``fileio``).
  """
  img = Image.fromarray(np.asarray(image_HWC, np.uint8))
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  if "://" in path:
    from leapalign_jax import fileio

    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    fileio.write_bytes(path, buffer.getvalue())
    return path
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
  os.close(fd)
  try:
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
  """``text`` in lines of at most ``width`` pixels (long words cut)."""
  lines: list[str] = []
  for para in str(text).split("\n"):
    line = ""
    for word in para.split():
      trial = f"{line} {word}" if line else word
      while draw.textlength(trial, font=font) > width and not line:
        trial = trial[:-1]  # one word wider than the tile: cut it
      if draw.textlength(trial, font=font) <= width:
        line = trial
        continue
      lines.append(line)
      line = word
      while draw.textlength(line, font=font) > width:
        line = line[:-1]
    lines.append(line)
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    lines[-1] = lines[-1][: max(len(lines[-1]) - 3, 0)] + "..."
  return lines


def captioned_grid(
  images_BHWC: np.ndarray,
  captions: list[str],
  cols: int | None = None,
  headers: list[str] | None = None,
  min_side: int = 128,
  max_lines: int = 4,
) -> np.ndarray:
  """A grid with ``captions[i]`` under tile ``i`` and ``headers`` over columns.

  Tiles smaller than ``min_side`` are upscaled (nearest) so that the text,
  in PIL's default font, fits under them. Returns a uint8 ``[H, W, 3]``.
  """
  from PIL import ImageDraw, ImageFont

  imgs = to_uint8(images_BHWC)
  n, h, w, _ = imgs.shape
  if len(captions) != n:
    raise ValueError(f"{len(captions)} captions for {n} images; give one each")
  scale = max(1, -(-min_side // min(h, w)))
  h, w = h * scale, w * scale
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 2
  wrapped = [_wrap(probe, c, font, w - 4, max_lines) for c in captions]
  cap_h = line_h * max(1, max(len(x) for x in wrapped)) + 4
  head_h = line_h + 4 if headers else 0
  pad = 2
  canvas = Image.new(
    "RGB",
    (cols * (w + pad) + pad, head_h + rows * (h + cap_h + pad) + pad),
    (255, 255, 255),
  )
  draw = ImageDraw.Draw(canvas)
  for q, text in enumerate(headers or []):
    (line,) = _wrap(draw, text, font, w - 4, 1)
    draw.text((pad + q * (w + pad) + 2, 2), line, fill=(0, 0, 0), font=font)
  for i, img in enumerate(imgs):
    r, q = divmod(i, cols)
    x, y = pad + q * (w + pad), head_h + pad + r * (h + cap_h + pad)
    tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
    canvas.paste(tile, (x, y))
    for k, line in enumerate(wrapped[i]):
      draw.text((x + 2, y + h + 2 + k * line_h), line, (0, 0, 0), font=font)
  return np.asarray(canvas)


def save_captioned_grid(
  images_BHWC: np.ndarray,
  captions: list[str],
  path: str,
  cols: int | None = None,
  headers: list[str] | None = None,
) -> str:
  """Saves ``captioned_grid`` as a PNG (``path`` may be ``gs://``)."""
  return save_png(captioned_grid(images_BHWC, captions, cols, headers), path)
