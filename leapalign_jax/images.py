"""Image files: PNGs and grids from ``[-1, 1]`` NHWC arrays (process 0)."""

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


def grid(
  images_BHWC: np.ndarray, cols: int | None = None, pad: int = 2
) -> np.ndarray:
  """Tiles a batch into one uint8 image with ``pad`` pixels of grey between."""
  imgs = to_uint8(images_BHWC)
  n, h, w, c = imgs.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  out = np.full(
    (rows * (h + pad) + pad, cols * (w + pad) + pad, c), 128, np.uint8
  )
  for i, img in enumerate(imgs):
    r, q = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    out[y : y + h, x : x + w] = img
  return out


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


def save_grid(
  images_BHWC: np.ndarray, path: str, cols: int | None = None
) -> str:
  """Saves a grid PNG; tiles smaller than 128 px are upscaled for viewing."""
  h = np.asarray(images_BHWC).shape[1]
  scale = max(1, 128 // h)
  return save_png(grid(images_BHWC, cols), path, scale=scale)
