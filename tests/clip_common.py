"""Tiny CLIP configs, inputs and helpers shared by the CLIP tests."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from leapalign_jax.convert import ConversionError
from leapalign_jax.convert.safetensors_io import TensorSource
from leapalign_jax.models import clip

TEXT = clip.CLIPTextConfig(
  vocab_size=128,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=16,
  eos_token_id=126,
)
VISION = clip.CLIPVisionConfig(
  hidden_size=48,
  intermediate_size=80,
  num_hidden_layers=2,
  num_attention_heads=2,
  image_size=16,
  patch_size=4,
)
TINY = clip.CLIPConfig(TEXT, VISION, 16)
EOS = 126


def make_ids(batch=2, length=16, seed=0, eos=EOS, pad=EOS):
  """Ids with bos, words, eos, then padding; id 127 (> eos) before the eos."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, length), pad, np.int32)
  for b in range(batch):
    n = 3 + 4 * b
    ids[b, 0] = 125
    ids[b, 1 : 1 + n] = rng.integers(3, 120, n)
    ids[b, 1 + n] = eos
  ids[1, 2] = 127  # the argmax rule would pool here
  return ids


def make_pixels(batch=2, size=16, seed=1):
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3))


def random_model(config, seed=0, scale=0.2):
  """A model with random parameters everywhere (norm scales around 1).

  Filled from numpy on the abstract model: no per-shape XLA compilation.
  """
  abstract = nnx.eval_shape(lambda: clip.CLIP(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  rng = np.random.default_rng(seed)
  for path, x in flat.items():
    value = scale * rng.standard_normal(x.shape).astype(np.float32)
    flat[path] = jnp.asarray(value + (path[-1] == "scale"))
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  return nnx.merge(graphdef, state)


@nnx.jit
def outputs(model, ids, pixels):
  """Every output of both towers (absent towers are skipped statically)."""
  out = {}
  if model.text_model is not None:
    hidden, pooled = model.encode_text(ids)
    out.update(text_hidden=hidden, text_pooled=pooled)
    if model.text_projection is not None:
      out["text_embeds"] = model.text_features(ids)
  if model.vision_model is not None:
    hidden, pooled = model.encode_image(pixels)
    out.update(image_hidden=hidden, image_pooled=pooled)
    if model.visual_projection is not None:
      out["image_embeds"] = model.image_features(pixels)
  return out


def run(model, ids=None, pixels=None):
  ids = make_ids() if ids is None else ids
  pixels = make_pixels() if pixels is None else pixels
  out = outputs(model, jnp.asarray(ids), jnp.asarray(pixels, jnp.float32))
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def tensors(path):
  src = TensorSource.from_files([path])
  return {k: np.array(src[k]) for k in src}


def assert_bytes_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


def error_of(fn):
  with pytest.raises(ConversionError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg
  return msg
