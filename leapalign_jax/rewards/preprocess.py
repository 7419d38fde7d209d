"""Differentiable reward-image preprocessing that reproduces the references.

Generator images ``[B, H, W, 3]`` in [-1, 1] are mapped to [0, 1] and
clipped, resized with one resampling matrix per axis, cropped or padded to
``size x size`` and normalised with the OpenAI CLIP mean/std (method.md
§8.3). After the clip every step is linear, so the pipelines are
differentiable and jit-able (sizes are static). The matrices are built on
the host for the static shapes, with the reference's own arithmetic, and
applied in fp32 by two ``einsum`` calls at HIGHEST precision (width pass,
then height pass, as PIL and torch do). A crop or a pad is folded into the
matrices (rows dropped, or zero rows added), so it costs nothing extra.

Resampling methods (``resample=``) and the reference each reproduces:

* ``"pil_bicubic"``: ``PIL.Image.resize(..., Image.BICUBIC)``. Keys cubic
  (a = -0.5) whose support is stretched by the downscale factor
  (antialiasing), centres ``(i + 0.5) * in / out``, PIL's window bounds,
  edge weights renormalised; float64 weights as in PIL. Equal to PIL on
  float ('F' mode) images to fp32 round-off. PIL on uint8 images applies
  the same weights in fixed point, rounding and clipping each pass to
  [0, 255]; with ``saturate=True`` this function differs from it only by
  that 8-bit rounding (about 1 LSB), and the fixed-point emulation of these
  matrices reproduces PIL's uint8 output bit for bit (see the tests).
  ``jax.image.resize(method="bicubic")`` uses the same kernel but computes
  its sample positions in float32 (up to ~1.5e-5 off at 512 -> 224).
* ``"torch_bicubic_aa"``: ``torch.nn.functional.interpolate(size=...,
  mode="bicubic", align_corners=False, antialias=True)``, which is also
  what torchvision's tensor ``Resize``/``F.resize`` with BICUBIC runs
  (``antialias`` defaults to True since torchvision 0.17). The same rule
  as PIL, but torch computes scale, centres and weights in float32; the
  matrix emulates that, which moves taps by up to ~1e-5 pixel relative to
  ``"pil_bicubic"`` (~1.5e-5 in [0, 1] pixel values at 512 -> 224).
* ``"torch_bicubic"``: the same call with ``antialias=False``: four taps of
  Keys cubic with a = -0.75 at ``(i + 0.5) * in / out - 0.5`` (float32,
  one fused multiply-add), edge pixels replicated, no antialiasing. With
  ``scale_factor=`` instead of ``size=`` torch maps coordinates with the
  factor and may differ.
* ``"pil_bilinear"``, ``"torch_bilinear_aa"``, ``"torch_bilinear"``: the
  same three conventions with the tent kernel (torchvision's default tensor
  ``Resize`` is ``"torch_bilinear_aa"``, as in AlignProp-style reward code).

``saturate=True`` clips each resize pass to [0, 1], as PIL's uint8 passes
do; ``False`` is the plain linear map of the float references (PIL 'F',
torch, and the LeapAlign training loop, which resizes the decoded float
tensor without clamping). Saturation only matters next to saturated sharp
edges, where the cubic overshoots (up to 15/255 on the test photos).

Pipelines and their defaults:

* :func:`hps_preprocess` (HPSv2.1): longer side to ``size`` with
  ``round(dim * size / max(h, w))`` (half to even), zero pad in [0, 1]
  (black) to a centred square with ``left = pad_w // 2`` and
  ``top = pad_h // 2``: OpenCLIP's ``ResizeMaxSize`` as used by HPSv2's
  evaluation transform, and by the LeapAlign/FlowBP training loop on the
  decoded tensor (torchvision, antialiased bicubic). Defaults
  ``"pil_bicubic"``, ``saturate=False``: the training loop's float map
  within ~1.5e-5 (``"torch_bicubic_aa"`` reproduces it to fp32 round-off),
  HPSv2's PIL evaluation transform exactly on float images and within
  8-bit rounding with ``saturate=True``. One deliberate difference:
  ``ResizeMaxSize`` does nothing (no pad either) when the longer side
  already equals ``size``; this always pads, so the output is square.
* :func:`clip_preprocess` (PickScore): shorter side to ``size`` with
  ``int(size * long / short)``, centre crop ``size x size``: the
  ``transformers`` CLIP image processor (PickScore's; PIL bicubic on uint8
  images). Defaults ``"pil_bicubic"``, ``saturate=True``: its
  ``pixel_values`` within 8-bit rounding (about 1/255 before
  normalisation), since that processor, not a float training loop, is the
  reference. Crop offsets: ``d // 2`` as transformers (``crop="floor"``,
  default) or ``int(round(d / 2))``, Python's half-to-even rounding, as
  torchvision's ``CenterCrop`` (``crop="round"``, OpenCLIP's standard
  transform); they differ when the excess ``d`` is 3 mod 4 (427x640
  photos: d = 111).

Outputs are NHWC fp32, normalised, ready for a CLIP vision tower.
"""

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Resample = Literal[
  "pil_bicubic",
  "torch_bicubic_aa",
  "torch_bicubic",
  "pil_bilinear",
  "torch_bilinear_aa",
  "torch_bilinear",
]
CropRounding = Literal["floor", "round"]

# Defaults per reward (see the module docstring for what each reproduces).
HPS_RESAMPLE: Resample = "pil_bicubic"
HPS_SATURATE = False
PICKSCORE_RESAMPLE: Resample = "pil_bicubic"
PICKSCORE_SATURATE = True


# ---------------------------------------------------------------------------
# Kernels and resampling matrices (host side, the references' arithmetic).
# ---------------------------------------------------------------------------


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic kernel (support 2) as torch writes it, in the dtype of ``x``.

  torch's ``cubic_convolution1/2`` expressions, so that float32 inputs
  round as torch's do.
  """
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(x.dtype)


def _pil_cubic(x: np.ndarray) -> np.ndarray:
  """PIL's ``bicubic_filter`` (a = -0.5) in float64, PIL's expressions."""
  a = -0.5
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _torch_aa_cubic(x: np.ndarray) -> np.ndarray:
  return _keys_cubic(x, -0.5)


def _torch_cubic(x: np.ndarray) -> np.ndarray:
  return _keys_cubic(x, -0.75)


def _triangle(x: np.ndarray) -> np.ndarray:
  """Linear-interpolation (tent) kernel with support 1."""
  return np.maximum(1 - np.abs(x), 0).astype(x.dtype)


def _pil_matrix(
  in_size: int,
  out_size: int,
  kernel: Callable[[np.ndarray], np.ndarray],
  support: float,
) -> np.ndarray:
  """PIL's ``precompute_coeffs`` (float64 throughout) as a matrix.

  Output pixel ``i`` has centre ``c = (i + 0.5) * in / out`` in input pixel
  units; when downsampling the kernel is stretched by ``in / out``. Input
  pixels ``x`` in ``[trunc(c - s + 0.5), trunc(c + s + 0.5))`` (clipped to
  the image) get ``kernel((x + 0.5 - c) / stretch)``, renormalised to sum 1.
  """
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  s = support * stretch
  c_O = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
  lo_O = np.maximum(np.floor(c_O - s + 0.5), 0.0)
  hi_O = np.minimum(np.floor(c_O + s + 0.5), in_size)
  x_I = np.arange(in_size, dtype=np.float64)
  # PIL's order of operations: (x - center + 0.5) * (1 / stretch).
  w_OI = kernel(((x_I[None, :] - c_O[:, None]) + 0.5) * (1.0 / stretch))
  inside_OI = (x_I[None, :] >= lo_O[:, None]) & (x_I[None, :] < hi_O[:, None])
  w_OI = np.where(inside_OI, w_OI, 0.0)
  total_O = w_OI.sum(axis=1, keepdims=True)
  return w_OI / np.where(total_O != 0.0, total_O, 1.0)


def _torch_aa_matrix(
  in_size: int,
  out_size: int,
  kernel: Callable[[np.ndarray], np.ndarray],
  support: float,
) -> np.ndarray:
  """Torch's antialiased weights for float32 tensors.

  The same rule as :func:`_pil_matrix`, but with torch's mixed
  float32/float64 arithmetic (``_compute_indices_min_size_weights_aa``):
  the scale, centres, stretched support and weights are float32. At large
  downscales this moves the taps by up to ~1e-5 pixel, which is visible
  at the 1e-5 level in the output; emulating it keeps the parity at fp32
  round-off.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  downscale = scale >= 1.0
  s = f32(support * float(scale)) if downscale else f32(support)
  inv = f32(1.0 / float(scale)) if downscale else f32(1.0)
  max_taps = int(np.ceil(s)) * 2 + 1
  c_O = (float(scale) * (np.arange(out_size) + 0.5)).astype(f32)
  lo_O = np.maximum(np.trunc((c_O - s).astype(np.float64) + 0.5), 0)
  hi_O = np.trunc((c_O + s).astype(np.float64) + 0.5)
  n_O = np.clip(np.minimum(hi_O, in_size) - lo_O, 0, max_taps).astype(int)
  lo_O = lo_O.astype(int)
  taps_OJ = np.zeros((out_size, max_taps), f32)
  total_O = np.zeros(out_size, f32)
  for j in range(max_taps):  # sequential float32 sum, as in torch
    d_O = ((j + lo_O).astype(f32) - c_O).astype(np.float64) + 0.5
    w_O = kernel((d_O * float(inv)).astype(f32))
    taps_OJ[:, j] = np.where(j < n_O, w_O, f32(0))
    total_O = total_O + taps_OJ[:, j]
  taps_OJ = taps_OJ / np.where(total_O != 0, total_O, f32(1))[:, None]
  return _scatter(taps_OJ, lo_O[:, None] + np.arange(max_taps), in_size)


def _torch_source_index(in_size: int, out_size: int) -> np.ndarray:
  """``area_pixel_compute_source_index`` in float32 (align_corners=False).

  ``scale * (i + 0.5) - 0.5`` is compiled to one fused multiply-add in
  torch's vectorised CPU kernels (and on CUDA), so it is rounded to float32
  once; rounding twice moves some taps by up to ~1.5e-5 pixel.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src_O = float(scale) * (np.arange(out_size) + 0.5) - 0.5
  return src_O.astype(np.float32)


def _torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Torch ``upsample_bicubic2d`` (a = -0.75, replicated edges, float32)."""
  f32 = np.float32
  src_O = _torch_source_index(in_size, out_size)
  i0_O = np.minimum(np.floor(src_O), in_size - 1).astype(int)
  t_O = np.clip(src_O - i0_O.astype(f32), f32(0), f32(1))
  taps_OJ = np.stack(
    [
      _torch_cubic((t_O + 1.0).astype(f32)),
      _torch_cubic(t_O),
      _torch_cubic((1.0 - t_O).astype(f32)),
      _torch_cubic((2.0 - t_O).astype(f32)),
    ],
    axis=1,
  )
  return _scatter(taps_OJ, i0_O[:, None] + np.arange(-1, 3), in_size)


def _torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Torch ``upsample_bilinear2d`` (source index clamped at 0, float32)."""
  f32 = np.float32
  if in_size == out_size:  # torch copies
    return np.eye(in_size)
  src_O = np.maximum(_torch_source_index(in_size, out_size), f32(0))
  i0_O = np.minimum(np.floor(src_O), in_size - 1).astype(int)
  t_O = np.clip(src_O - i0_O.astype(f32), f32(0), f32(1))
  taps_OJ = np.stack([(1.0 - t_O).astype(f32), t_O], axis=1)
  return _scatter(taps_OJ, i0_O[:, None] + np.arange(2), in_size)


def _scatter(
  taps_OJ: np.ndarray, idx_OJ: np.ndarray, in_size: int
) -> np.ndarray:
  """Dense ``[O, in]`` matrix from taps at (edge-clamped) input indices."""
  out_size = taps_OJ.shape[0]
  w_OI = np.zeros((out_size, in_size))
  rows_OJ = np.broadcast_to(np.arange(out_size)[:, None], idx_OJ.shape)
  cols_OJ = np.clip(idx_OJ, 0, in_size - 1)
  np.add.at(w_OI, (rows_OJ, cols_OJ), taps_OJ.astype(np.float64))
  return w_OI


_BUILDERS: dict[str, Callable[[int, int], np.ndarray]] = {
  "pil_bicubic": lambda i, o: _pil_matrix(i, o, _pil_cubic, 2.0),
  "torch_bicubic_aa": lambda i, o: _torch_aa_matrix(i, o, _torch_aa_cubic, 2.0),
  "torch_bicubic": _torch_bicubic_matrix,
  "pil_bilinear": lambda i, o: _pil_matrix(i, o, _triangle, 1.0),
  "torch_bilinear_aa": lambda i, o: _torch_aa_matrix(i, o, _triangle, 1.0),
  "torch_bilinear": _torch_bilinear_matrix,
}
RESAMPLE_METHODS: tuple[str, ...] = tuple(_BUILDERS)


@functools.lru_cache(maxsize=256)
def resize_matrix(
  in_size: int, out_size: int, resample: Resample
) -> np.ndarray:
  """Resampling matrix ``[out_size, in_size]`` (float64, read-only).

  Row ``i`` holds the weights of output pixel ``i``; rows sum to 1.

  Args:
    in_size: input length along the axis.
    out_size: output length along the axis.
    resample: one of :data:`RESAMPLE_METHODS` (see the module docstring).

  Returns:
    The matrix; ``resize_matrix(n, n, m)`` is the identity for every method.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"Sizes must be >= 1, got {in_size} -> {out_size}.")
  if resample not in _BUILDERS:
    raise ValueError(
      f"Unknown resample {resample!r}; expected one of {RESAMPLE_METHODS}."
    )
  m = _BUILDERS[resample](in_size, out_size)
  m.setflags(write=False)
  return m


def _placed(m_OI: np.ndarray, start: int, length: int) -> np.ndarray:
  """Output rows ``[start, start + length)`` of ``m``; zero rows outside.

  A negative ``start`` or ``length > out`` pads with zero rows (a centred
  zero pad); otherwise the rows are cropped.
  """
  out_size, in_size = m_OI.shape
  p_LI = np.zeros((length, in_size))
  src = np.arange(start, start + length)
  keep = (src >= 0) & (src < out_size)
  p_LI[keep] = m_OI[src[keep]]
  return p_LI


# ---------------------------------------------------------------------------
# Output geometry (host side, mirrors the references' integer rules).
# ---------------------------------------------------------------------------


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """``(h, w)`` after scaling the longer side to ``size`` (``ResizeMaxSize``).

  Uses Python's ``round`` (half to even) on ``dim * (size / max(h, w))``.
  """
  scale = size / float(max(height, width))
  new_h, new_w = (round(dim * scale) for dim in (height, width))
  if min(new_h, new_w) < 1:
    raise ValueError(f"{height}x{width} -> {new_h}x{new_w}: an empty side.")
  return new_h, new_w


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """``(h, w)`` after scaling the shorter side to ``size``.

  The longer side is ``int(size * long / short)`` (truncated), as in
  transformers' ``get_resize_output_image_size`` and torchvision's
  ``Resize(int)``.
  """
  short, long = sorted((height, width))
  new_long = int(size * long / short)
  return (size, new_long) if height <= width else (new_long, size)


def center_crop_offset(
  length: int, crop: int, rounding: CropRounding = "floor"
) -> int:
  """Start of a centred window of ``crop`` in ``length`` (``crop <= length``).

  ``"floor"``: ``(length - crop) // 2`` (transformers ``center_crop``).
  ``"round"``: ``int(round((length - crop) / 2))``, half to even
  (torchvision ``CenterCrop``).
  """
  if crop > length:
    raise ValueError(f"Crop {crop} is larger than the side {length}.")
  if rounding == "floor":
    return (length - crop) // 2
  if rounding == "round":
    return int(round((length - crop) / 2.0))
  raise ValueError(f"Unknown crop rounding {rounding!r}.")


# ---------------------------------------------------------------------------
# Device side.
# ---------------------------------------------------------------------------


def _apply_separable(
  x_BHWC: jax.Array,
  m_hH: np.ndarray,
  m_wW: np.ndarray,
  saturate: bool,
  precision: jax.lax.PrecisionLike,
) -> jax.Array:
  """Applies ``m_wW`` along the width, then ``m_hH`` along the height.

  With ``saturate``, each pass is clipped to [0, 1], as PIL clips each pass
  of a uint8 image to [0, 255].
  """
  x = x_BHWC.astype(jnp.float32)
  if not _is_identity(m_wW):
    w_wW = jnp.asarray(m_wW, jnp.float32)
    x = jnp.einsum("wW,bhWc->bhwc", w_wW, x, precision=precision)
    x = jnp.clip(x, 0.0, 1.0) if saturate else x
  if not _is_identity(m_hH):
    w_hH = jnp.asarray(m_hH, jnp.float32)
    x = jnp.einsum("hH,bHwc->bhwc", w_hH, x, precision=precision)
    x = jnp.clip(x, 0.0, 1.0) if saturate else x
  return x


def _is_identity(m: np.ndarray) -> bool:
  return m.shape[0] == m.shape[1] and np.array_equal(m, np.eye(m.shape[0]))


def resize(
  x_BHWC: jax.Array,
  size: tuple[int, int],
  resample: Resample = "pil_bicubic",
  saturate: bool = False,
  precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """Resizes NHWC images to ``size = (height, width)`` (fp32 result).

  Args:
    x_BHWC: images of any float dtype, any height and width.
    size: static output ``(height, width)``.
    resample: resampling method (see the module docstring).
    saturate: clip each pass to [0, 1] like PIL on uint8 images (for
      [0, 1] inputs); False is the plain linear resize of float references.
    precision: einsum precision; HIGHEST keeps fp32 on GPU/TPU too.

  Returns:
    ``[B, height, width, C]`` float32.
  """
  _, H, W, _ = x_BHWC.shape
  m_hH = resize_matrix(H, size[0], resample)
  m_wW = resize_matrix(W, size[1], resample)
  return _apply_separable(x_BHWC, m_hH, m_wW, saturate, precision)


def to_unit_range(images_BHWC: jax.Array) -> jax.Array:
  """Maps [-1, 1] images to [0, 1] in fp32 and clips."""
  x = images_BHWC.astype(jnp.float32)
  return jnp.clip(x * 0.5 + 0.5, 0.0, 1.0)


def normalize(
  x_BHWC: jax.Array,
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
  std: tuple[float, ...] = OPENAI_CLIP_STD,
) -> jax.Array:
  """Per-channel ``(x - mean) / std`` on the last axis."""
  mean_111C = jnp.asarray(mean, jnp.float32).reshape(1, 1, 1, -1)
  std_111C = jnp.asarray(std, jnp.float32).reshape(1, 1, 1, -1)
  return (x_BHWC - mean_111C) / std_111C


def hps_preprocess(
  images_BHWC: jax.Array,
  size: int = 224,
  resample: Resample = HPS_RESAMPLE,
  saturate: bool = HPS_SATURATE,
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
  std: tuple[float, ...] = OPENAI_CLIP_STD,
) -> jax.Array:
  """HPSv2.1 input: longer side to ``size``, centred zero pad, normalise.

  Args:
    images_BHWC: generator images in [-1, 1], any height and width.
    size: side of the square output.
    resample: resampling method; the default matches HPSv2's PIL transform
      and the torchvision-based LeapAlign training loop.
    saturate: clip each resize pass to [0, 1] as PIL's uint8 passes do.
    mean: per-channel normalisation mean.
    std: per-channel normalisation std.

  Returns:
    ``[B, size, size, C]`` float32; the pad is black before normalisation.
  """
  _, H, W, _ = images_BHWC.shape
  new_h, new_w = longest_side_size(H, W, size)
  # ResizeMaxSize pads (left, top) = (pad_w // 2, pad_h // 2).
  top, left = (size - new_h) // 2, (size - new_w) // 2
  m_hH = _placed(resize_matrix(H, new_h, resample), -top, size)
  m_wW = _placed(resize_matrix(W, new_w, resample), -left, size)
  x = _apply_separable(
    to_unit_range(images_BHWC), m_hH, m_wW, saturate, jax.lax.Precision.HIGHEST
  )
  return normalize(x, mean, std)


def clip_preprocess(
  images_BHWC: jax.Array,
  size: int = 224,
  resample: Resample = PICKSCORE_RESAMPLE,
  crop: CropRounding = "floor",
  saturate: bool = PICKSCORE_SATURATE,
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
  std: tuple[float, ...] = OPENAI_CLIP_STD,
) -> jax.Array:
  """CLIP/PickScore input: shorter side to ``size``, centre crop, normalise.

  Args:
    images_BHWC: generator images in [-1, 1], any height and width.
    size: side of the square output.
    resample: resampling method; the default matches PickScore's
      ``CLIPImageProcessor`` (PIL bicubic).
    crop: ``"floor"`` for transformers' crop offsets, ``"round"`` for
      torchvision's ``CenterCrop``.
    saturate: clip each resize pass to [0, 1] as PIL's uint8 passes do.
    mean: per-channel normalisation mean.
    std: per-channel normalisation std.

  Returns:
    ``[B, size, size, C]`` float32.
  """
  _, H, W, _ = images_BHWC.shape
  new_h, new_w = shortest_side_size(H, W, size)
  top = center_crop_offset(new_h, size, crop)
  left = center_crop_offset(new_w, size, crop)
  m_hH = _placed(resize_matrix(H, new_h, resample), top, size)
  m_wW = _placed(resize_matrix(W, new_w, resample), left, size)
  x = _apply_separable(
    to_unit_range(images_BHWC), m_hH, m_wW, saturate, jax.lax.Precision.HIGHEST
  )
  return normalize(x, mean, std)
