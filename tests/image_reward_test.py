"""ImageReward: parity with transformers' BLIP encoders, both layouts.

The reference package (``image-reward``) needs timm and fairscale, which do
not install beside torch 2.13; its BLIP is salesforce BLIP's, which
transformers ports as ``BlipVisionModel`` / ``BlipTextModel`` (the latter
"adapted from BLIP's med.py"). A tiny random pair of those plus the
reference's five-linear head is the torch reference here, saved under
transformers' names and loaded through our converter; our ``ImageReward.pt``
layout is then checked by an export / reload round trip.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
import torch_refs  # noqa: E402

from leapalign_jax.convert.errors import ConversionError  # noqa: E402
from leapalign_jax.convert.image_reward import (  # noqa: E402
  convert_image_reward,
  export_image_reward,
  load_image_reward,
)
from leapalign_jax.convert.safetensors_io import save_file  # noqa: E402
from leapalign_jax.models import image_reward as ir  # noqa: E402

pytestmark = pytest.mark.torch
TINY = ir.VARIANTS["tiny"]


def torch_parts():
  v, t = TINY.vision, TINY.text
  vision = transformers.BlipVisionModel(
    transformers.BlipVisionConfig(
      hidden_size=v.hidden_size,
      intermediate_size=int(v.hidden_size * v.mlp_ratio),
      num_hidden_layers=v.num_layers,
      num_attention_heads=v.num_heads,
      image_size=v.image_size,
      patch_size=v.patch_size,
      layer_norm_eps=v.eps,
      hidden_act="gelu",
    )
  )
  text = transformers.BlipTextModel(
    transformers.BlipTextConfig(
      vocab_size=t.vocab_size,
      hidden_size=t.hidden_size,
      intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_layers,
      num_attention_heads=t.num_heads,
      max_position_embeddings=t.max_position_embeddings,
      encoder_hidden_size=t.encoder_width,
      layer_norm_eps=t.eps,
      hidden_act="gelu",
      is_decoder=True,  # builds the cross-attention layers
    ),
    add_pooling_layer=False,
  )
  dims = (t.hidden_size, *TINY.mlp_dims, 1)
  layers = []
  for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
    layers.append(torch.nn.Linear(a, b))
    if i < len(dims) - 3:
      layers.append(torch.nn.Dropout(0.1))
  mlp = torch.nn.Sequential(*layers)
  return [
    torch_refs.randomize(m, s) for m, s in ((vision, 1), (text, 2), (mlp, 3))
  ]


def inputs(seed=0, batch=3):
  rng = np.random.default_rng(seed)
  size, L = TINY.vision.image_size, 11
  pixels = rng.standard_normal((batch, 3, size, size), np.float32)
  ids = rng.integers(1, TINY.text.vocab_size, (batch, L))
  mask = np.ones((batch, L), np.int64)
  mask[1, 7:] = 0  # padded prompts: their pad tokens are masked out
  mask[2, 4:] = 0
  ids = np.where(mask == 1, ids, 0)
  return pixels, ids, mask


def torch_score(parts, pixels, ids, mask):
  vision, text, mlp = parts
  with torch.no_grad():
    image = vision(pixel_values=torch.from_numpy(pixels)).last_hidden_state
    states = text(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      encoder_hidden_states=image,
      encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
    ).last_hidden_state
    r = mlp(states[:, 0])[:, 0]
  return ((r - TINY.mean) / TINY.std).numpy()


def our_score(model, pixels, ids, mask):
  return np.asarray(
    model.score(
      jnp.asarray(pixels.transpose(0, 2, 3, 1)),
      jnp.asarray(ids),
      jnp.asarray(mask),
    )
  )


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
  parts = torch_parts()
  state = {}
  for prefix, module in zip(
    ("vision_model.", "text_encoder.", "mlp.layers."), parts
  ):
    for k, v in module.state_dict().items():
      state[prefix + k] = v.numpy()
  path = str(tmp_path_factory.mktemp("ir") / "hf.safetensors")
  save_file(state, path)
  return path, parts


def test_matches_transformers_blip(hf_file):
  path, parts = hf_file
  _, model = load_image_reward(path, config="tiny")
  x = inputs()
  ref = torch_score(parts, *x)
  np.testing.assert_allclose(our_score(model, *x), ref, rtol=1e-5, atol=1e-5)


def test_imagereward_layout_round_trip(hf_file, tmp_path):
  path, parts = hf_file
  _, model = load_image_reward(path, config="tiny")
  (out,) = export_image_reward(model, str(tmp_path / "ir.safetensors"))
  _, again = load_image_reward(out, config="tiny")
  x = inputs(seed=4)
  np.testing.assert_array_equal(our_score(again, *x), our_score(model, *x))


def test_convert_writes_the_imagereward_layout(hf_file, tmp_path):
  """Streaming conversion (no model built) = load then export."""
  path, _ = hf_file
  (out,) = convert_image_reward(path, str(tmp_path), config="tiny")
  assert out.endswith("ImageReward.safetensors")
  _, model = load_image_reward(path, config="tiny")
  _, again = load_image_reward(out, config="tiny")
  x = inputs(seed=5)
  np.testing.assert_array_equal(our_score(again, *x), our_score(model, *x))


def test_padding_is_masked(hf_file):
  """Changing a padded token's id must not change the score."""
  path, _ = hf_file
  _, model = load_image_reward(path, config="tiny")
  pixels, ids, mask = inputs()
  other = ids.copy()
  other[2, 6] = 5
  np.testing.assert_array_equal(
    our_score(model, pixels, other, mask), our_score(model, pixels, ids, mask)
  )


def test_unknown_size_needs_a_config(hf_file):
  path, _ = hf_file
  with pytest.raises(ConversionError, match="head count is not stored"):
    load_image_reward(path)


def test_published_size_parameter_count():
  """``imagereward`` (ViT-L/16 + BERT-base with cross-attention + head)."""
  import jax
  from flax import nnx

  c = ir.VARIANTS["imagereward"]
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: ir.ImageReward(c, rngs=nnx.Rngs(0)))
  ours = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  with torch.device("meta"):
    vision = transformers.BlipVisionModel(
      transformers.BlipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
      )
    )
    text = transformers.BlipTextModel(
      transformers.BlipTextConfig(
        vocab_size=30524,
        encoder_hidden_size=1024,
        max_position_embeddings=512,
        is_decoder=True,
      ),
      add_pooling_layer=False,
    )
  head = sum(
    a * b + b for a, b in zip((768, 1024, 128, 64, 16), (1024, 128, 64, 16, 1))
  )
  ref = sum(p.numel() for m in (vision, text) for p in m.parameters()) + head
  assert ours == ref
