"""Parity of reward preprocessing with PIL, torch and the reward processors.

Real photos (scikit-image, scikit-learn), square and non-square, resized up
and down to 224 and to odd sizes. Tolerances are absolute, on [0, 1] pixel
values for resizes and on normalised values for the pipelines.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from leapalign_jax.rewards import preprocess as pp

skdata = pytest.importorskip("skimage.data")
sk_datasets = pytest.importorskip("sklearn.datasets")

MEAN_C = np.asarray(pp.OPENAI_CLIP_MEAN, np.float32)
STD_C = np.asarray(pp.OPENAI_CLIP_STD, np.float32)
LSB = 1.0 / 255.0

# (photo, output (height, width)): down, up, mixed, odd sizes, aspect kept.
RESIZE_CASES = [
  ("astronaut", (224, 224)),  # 512x512 down
  ("chelsea", (224, 336)),  # 300x451 down, aspect kept
  ("coffee", (37, 53)),  # 400x600 strong down, odd
  ("china", (149, 224)),  # 427x640 down
  ("flower", (224, 335)),  # 427x640 down (shortest side)
  ("crop", (224, 355)),  # 63x100 up
  ("crop", (37, 150)),  # 63x100 down in H, up in W
]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
  """uint8 HWC photos."""
  china, flower = sk_datasets.load_sample_images().images
  astronaut = skdata.astronaut()
  return {
    "astronaut": astronaut,  # 512x512
    "chelsea": skdata.chelsea(),  # 300x451
    "coffee": skdata.coffee(),  # 400x600
    "china": china,  # 427x640
    "flower": flower,  # 427x640
    "crop": np.ascontiguousarray(astronaut[100:163, 50:150]),  # 63x100
    "odd": np.ascontiguousarray(astronaut[:224, :227]),  # crop excess 3
  }


def _unit(u8: np.ndarray) -> np.ndarray:
  return u8.astype(np.float32) / 255.0


def _signed(u8: np.ndarray) -> jax.Array:
  """uint8 photo -> [1, H, W, 3] generator-style image in [-1, 1]."""
  return jnp.asarray(_unit(u8)[None] * 2.0 - 1.0)


def _ours(x01: np.ndarray, size, resample, saturate=False) -> np.ndarray:
  out = pp.resize(jnp.asarray(x01[None]), size, resample, saturate)
  return np.asarray(out)[0]


def _pil_float(x01: np.ndarray, size, resample=Image.BICUBIC) -> np.ndarray:
  """PIL resize of each channel as a float ('F' mode) image."""
  h, w = size
  chans = [
    np.asarray(Image.fromarray(x01[..., c], mode="F").resize((w, h), resample))
    for c in range(x01.shape[-1])
  ]
  return np.stack(chans, axis=-1)


def _fixed_point(m: np.ndarray) -> np.ndarray:
  """PIL's 8-bit coefficients: 22 fraction bits, rounded half away from 0."""
  v = m * (1 << 22)
  return np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int64)


def _pil_uint8_emulation(u8: np.ndarray, size, resample) -> list[np.ndarray]:
  """PIL's uint8 two-pass resampler driven by our matrices, in both orders.

  Each pass rounds to 8 bits and clips. The published ``Resample.c`` always
  runs the horizontal pass first; the installed Pillow runs the vertical
  pass first for some shapes (a speed heuristic), which changes a few
  pixels by 1 LSB, so both orders are returned.
  """
  H, W = u8.shape[:2]
  h, w = size
  half = 1 << 21

  def width_pass(x):
    if w == W:
      return x
    k = _fixed_point(pp.resize_matrix(W, w, resample))
    return np.clip((half + np.einsum("wW,hWc->hwc", k, x)) >> 22, 0, 255)

  def height_pass(x):
    if h == H:
      return x
    k = _fixed_point(pp.resize_matrix(H, h, resample))
    return np.clip((half + np.einsum("hH,Hwc->hwc", k, x)) >> 22, 0, 255)

  x = u8.astype(np.int64)
  return [height_pass(width_pass(x)), width_pass(height_pass(x))]


def _matches_one(candidates: list[np.ndarray], ref: np.ndarray) -> bool:
  return any(np.array_equal(c, ref) for c in candidates)


def _normalize(x01_HWC: np.ndarray) -> np.ndarray:
  return (x01_HWC - MEAN_C) / STD_C


# ---------------------------------------------------------------------------
# Resampling matrices.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("resample", pp.RESAMPLE_METHODS)
def test_resize_matrix_rows_sum_to_one_and_identity(resample):
  for in_size, out_size in [(512, 224), (63, 224), (7, 3), (1, 5), (5, 1)]:
    m = pp.resize_matrix(in_size, out_size, resample)
    assert m.shape == (out_size, in_size)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    assert not m.flags.writeable
  np.testing.assert_array_equal(pp.resize_matrix(37, 37, resample), np.eye(37))


def test_resize_matrix_rejects_bad_arguments():
  with pytest.raises(ValueError, match="Unknown resample"):
    pp.resize_matrix(4, 2, "lanczos")
  with pytest.raises(ValueError, match=">= 1"):
    pp.resize_matrix(4, 0, "pil_bicubic")


# ---------------------------------------------------------------------------
# Resize parity.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size"), RESIZE_CASES)
def test_pil_float_parity(photos, name, size):
  x = _unit(photos[name])
  for resample, pil_filter in [
    ("pil_bicubic", Image.BICUBIC),
    ("pil_bilinear", Image.BILINEAR),
  ]:
    err = np.abs(_ours(x, size, resample) - _pil_float(x, size, pil_filter))
    assert err.max() <= 1e-6, (resample, err.max())  # measured <= 2.4e-7


@pytest.mark.parametrize(("name", "size"), RESIZE_CASES)
def test_pil_uint8_parity(photos, name, size):
  u8 = photos[name]
  h, w = size
  ref = np.asarray(Image.fromarray(u8).resize((w, h), Image.BICUBIC))
  # Our weights in PIL's fixed point reproduce PIL's uint8 output exactly.
  assert _matches_one(_pil_uint8_emulation(u8, size, "pil_bicubic"), ref)
  # The float resize differs only by 8-bit rounding once it saturates as
  # PIL does (two rounded passes: at most ~1 LSB before the final rounding).
  ours = _ours(_unit(u8), size, "pil_bicubic", saturate=True)
  lsb = np.abs(ours - ref.astype(np.float32) / 255.0) / LSB
  assert lsb.max() <= 1.25, lsb.max()  # measured <= 1.07
  # Without saturation the overshoot at saturated edges is kept.
  raw = _ours(_unit(u8), size, "pil_bicubic")
  assert np.abs(np.round(np.clip(raw, 0, 1) * 255) - ref).max() <= 6


@pytest.mark.torch
@pytest.mark.parametrize(("name", "size"), RESIZE_CASES)
def test_torch_interpolate_parity(photos, name, size):
  torch = pytest.importorskip("torch")
  x = _unit(photos[name])
  x_BCHW = torch.from_numpy(x).permute(2, 0, 1)[None]
  for resample, mode, antialias in [
    ("torch_bicubic", "bicubic", False),
    ("torch_bicubic_aa", "bicubic", True),
    ("torch_bilinear", "bilinear", False),
    ("torch_bilinear_aa", "bilinear", True),
  ]:
    ref = torch.nn.functional.interpolate(
      x_BCHW, size=size, mode=mode, align_corners=False, antialias=antialias
    )
    ref = ref[0].permute(1, 2, 0).numpy()
    err = np.abs(_ours(x, size, resample) - ref).max()
    assert err <= 1e-5, (resample, err)  # measured <= 1.2e-6


def test_jax_image_resize_matches_pil_bicubic_only(photos):
  x = _unit(photos["astronaut"])
  ref = _pil_float(x, (224, 224))
  jax_out = np.asarray(jax.image.resize(jnp.asarray(x), (224, 224, 3), "cubic"))
  # Same antialiased Keys kernel; its float32 sample positions cost ~1e-5.
  assert np.abs(jax_out - ref).max() <= 5e-5
  # torch's non-antialiased a = -0.75 kernel is a different map.
  torch_like = _ours(x, (224, 224), "torch_bicubic")
  assert np.abs(jax_out - torch_like).max() > 1e-2


# ---------------------------------------------------------------------------
# Pipelines.
# ---------------------------------------------------------------------------


def test_geometry_rules():
  assert pp.longest_side_size(300, 451, 224) == (149, 224)
  assert pp.longest_side_size(63, 100, 224) == (141, 224)
  assert pp.shortest_side_size(427, 640, 224) == (224, 335)
  assert pp.shortest_side_size(640, 427, 224) == (335, 224)
  # Excess d: floor is d // 2; torchvision rounds d / 2 half to even.
  for d, floor, rounded in [(1, 0, 0), (3, 1, 2), (5, 2, 2), (7, 3, 4)]:
    assert pp.center_crop_offset(224 + d, 224, "floor") == floor
    assert pp.center_crop_offset(224 + d, 224, "round") == rounded


@pytest.mark.torch
@pytest.mark.parametrize(
  "name", ["astronaut", "chelsea", "china", "crop", "odd"]
)
def test_clip_preprocess_matches_transformers_processor(photos, name):
  clip_module = pytest.importorskip(
    "transformers.models.clip.image_processing_pil_clip"
  )
  u8 = photos[name]
  processor = clip_module.CLIPImageProcessorPil()  # PickScore's settings
  ref = processor(images=u8, return_tensors="np")["pixel_values"][0]
  ref = ref.transpose(1, 2, 0)
  # Geometry and kernel exactly: PIL fixed point driven by our rules.
  size = pp.shortest_side_size(*u8.shape[:2], 224)
  top = pp.center_crop_offset(size[0], 224)
  left = pp.center_crop_offset(size[1], 224)
  emulated = [
    _normalize(e[top : top + 224, left : left + 224] / 255.0)
    for e in _pil_uint8_emulation(u8, size, "pil_bicubic")
  ]
  assert min(np.abs(e - ref).max() for e in emulated) <= 1e-5
  # The float pipeline is within 8-bit rounding of the processor.
  ours = np.asarray(pp.clip_preprocess(_signed(u8)))[0]  # saturates
  lsb = np.abs(ours - ref) * STD_C / LSB
  assert lsb.max() <= 1.25, lsb.max()  # measured <= 1.07


def test_clip_preprocess_crop_rounding(photos):
  u8 = photos["china"]  # 427x640 -> 224x335: excess 111
  x = _unit(u8)
  resized = _pil_float(x, (224, 335))
  for crop, left in [("floor", 55), ("round", 56)]:
    ref = _normalize(resized[:, left : left + 224])
    ours = pp.clip_preprocess(_signed(u8), crop=crop, saturate=False)
    ours = np.asarray(ours)[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def _resize_max_size_reference(x01: np.ndarray, size: int, resize_fn):
  """OpenCLIP ``ResizeMaxSize`` (HPSv2), written from its behaviour.

  Longer side to ``size`` with ``round(dim * scale)``, then a constant 0
  pad with (left, top, right, bottom) = (pw // 2, ph // 2, pw - pw // 2,
  ph - ph // 2); nothing at all when the scale is exactly 1.
  """
  h, w = x01.shape[:2]
  scale = size / float(max(h, w))
  if scale == 1.0:
    return x01
  new_h, new_w = (round(dim * scale) for dim in (h, w))
  x = resize_fn(x01, (new_h, new_w))
  ph, pw = size - new_h, size - new_w
  return np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "crop"])
def test_hps_preprocess_matches_resize_max_size(photos, name):
  u8 = photos[name]
  ours = np.asarray(pp.hps_preprocess(_signed(u8)))[0]
  # Float reference (PIL 'F' mode): exact.
  ref = _normalize(_resize_max_size_reference(_unit(u8), 224, _pil_float))
  np.testing.assert_allclose(ours, ref, atol=1e-5)

  # uint8 reference (HPSv2's evaluation transform): within 8-bit rounding.
  def pil_uint8(x01, size):
    img = Image.fromarray(np.round(x01 * 255).astype(np.uint8))
    return np.asarray(img.resize(size[::-1], Image.BICUBIC)) / 255.0

  ref8 = _normalize(_resize_max_size_reference(_unit(u8), 224, pil_uint8))
  ours8 = np.asarray(pp.hps_preprocess(_signed(u8), saturate=True))[0]
  lsb = np.abs(ours8 - ref8) * STD_C / LSB
  assert lsb.max() <= 1.25, lsb.max()
  # The pad is black before normalisation.
  if u8.shape[0] != u8.shape[1]:
    np.testing.assert_allclose(ours[0, 0], -MEAN_C / STD_C, atol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "crop"])
def test_hps_preprocess_matches_torch_training_transform(photos, name):
  """The LeapAlign/FlowBP loop: torchvision bicubic (AA) resize + pad."""
  torch = pytest.importorskip("torch")
  u8 = photos[name]

  def torch_aa(x01, size):
    x_BCHW = torch.from_numpy(np.ascontiguousarray(x01)).permute(2, 0, 1)
    out = torch.nn.functional.interpolate(
      x_BCHW[None],
      size=size,
      mode="bicubic",
      align_corners=False,
      antialias=True,
    )
    return out[0].permute(1, 2, 0).numpy()

  ref = _normalize(_resize_max_size_reference(_unit(u8), 224, torch_aa))
  ours = pp.hps_preprocess(_signed(u8), resample="torch_bicubic_aa")
  np.testing.assert_allclose(np.asarray(ours)[0], ref, atol=1e-5)


# ---------------------------------------------------------------------------
# Differentiability, jit, dtypes.
# ---------------------------------------------------------------------------


def _pipelines():
  for resample in pp.RESAMPLE_METHODS:
    yield "hps", functools.partial(pp.hps_preprocess, resample=resample)
    yield "clip", functools.partial(pp.clip_preprocess, resample=resample)


@pytest.mark.parametrize("shape", [(2, 48, 70, 3), (1, 20, 13, 3)])
def test_gradients_finite_and_nonzero(shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-0.9, 0.9, shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(shape[0], 37, 37, 3)), jnp.float32)
  for _, fn in _pipelines():
    f = functools.partial(fn, size=37)
    g = jax.grad(lambda x, f=f: jnp.sum(f(x) * w))(x)
    assert g.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(g)))
    assert bool(jnp.all(jnp.abs(g).sum(axis=(1, 2, 3)) > 0))


def test_jit_static_shapes_and_dtypes():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 50, 70, 3)), jnp.bfloat16)
  for kind, fn in [
    ("hps", pp.hps_preprocess),
    ("clip", pp.clip_preprocess),
  ]:
    jitted = jax.jit(functools.partial(fn, size=37))
    out = jitted(x)
    assert out.shape == (2, 37, 37, 3), kind
    assert out.dtype == jnp.float32, kind
    np.testing.assert_allclose(out, fn(x, size=37), atol=1e-6)
  out = jax.jit(pp.resize, static_argnums=(1, 2))(x, (9, 101), "torch_bicubic")
  assert out.shape == (2, 9, 101, 3) and out.dtype == jnp.float32


def test_square_input_at_size_is_identity_up_to_normalisation():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(-1, 1, (1, 224, 224, 3)), jnp.float32)
  expected = pp.normalize(pp.to_unit_range(x))
  for fn in (pp.hps_preprocess, pp.clip_preprocess):
    np.testing.assert_array_equal(fn(x), expected)


def test_hps_pads_even_when_longer_side_already_fits():
  # ResizeMaxSize would return the 37x20 image unpadded; we always pad.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(-1, 1, (1, 37, 20, 3)), jnp.float32)
  out = np.asarray(pp.hps_preprocess(x, size=37))[0]
  assert out.shape == (37, 37, 3)
  inner = np.asarray(pp.normalize(pp.to_unit_range(x)))[0]
  np.testing.assert_array_equal(out[:, 8:28], inner)  # left pad 17 // 2
  np.testing.assert_allclose(
    out[:, :8], np.broadcast_to(-MEAN_C / STD_C, (37, 8, 3)), atol=1e-6
  )
  np.testing.assert_allclose(
    out[:, 28:], np.broadcast_to(-MEAN_C / STD_C, (37, 9, 3)), atol=1e-6
  )
