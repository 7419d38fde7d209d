"""SD3 LoRA export: diffusers' ``StableDiffusion3Pipeline`` loads our file.

A tiny SD3 (dual-attention, plain and last block) gets adapters on
``families.sd3.SD3_TARGETS`` with random ``B``; its base weights go out in
diffusers layout, its adapters through the family's ``export_lora``. The
pipeline's ``load_lora_weights`` must reproduce our adapted forward, and so
must the merged export read by diffusers.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leapalign_jax import sampling
from leapalign_jax.convert import lora as lora_convert
from leapalign_jax.convert.safetensors_io import TensorSource
from leapalign_jax.convert.sd3 import export_sd3
from leapalign_jax.families import sd3 as sd3_family
from leapalign_jax.models import lora as lora_lib
from leapalign_jax.models import sd3

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

pytestmark = pytest.mark.torch

CFG = dataclasses.replace(
  sd3.VARIANTS["tiny"], in_channels=4, out_channels=4, zero_init=False
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sd3_lora")
  model = sd3.SD3(CFG, rngs=nnx.Rngs(0))
  export_sd3(model, str(tmp / "base" / "transformer"))
  paths = lora_lib.add_lora(
    model, sd3_family.SD3_TARGETS, 4, 8.0, rngs=nnx.Rngs(1)
  )
  rng = np.random.default_rng(0)
  for m in lora_convert.adapted_modules(model).values():
    m.lora_b[...] = jnp.asarray(
      0.3 * rng.standard_normal(m.lora_b.shape), jnp.float32
    )
  (tmp / "lora").mkdir()
  written = sd3_family.export_lora(model, str(tmp / "lora"))
  merged = sd3_family.export_merged(model, str(tmp / "merged"), "diffusers")
  rng = np.random.default_rng(1)
  x = dict(
    latent=rng.standard_normal((2, 4, 8, 12), np.float32),
    context=rng.standard_normal((2, 5, CFG.context_in_dim), np.float32),
    pooled=rng.standard_normal((2, CFG.pooled_dim), np.float32),
    t=np.array([0.3, 0.85], np.float32),
  )
  return dict(
    tmp=tmp, model=model, paths=paths, lora=written, merged=merged, x=x
  )


def ours(model, x):
  latent = jnp.asarray(x["latent"]).transpose(0, 2, 3, 1)
  B, H, W, C = latent.shape
  v = model(
    sampling.pack(latent),
    (H // 2, W // 2),
    jnp.asarray(x["context"]),
    jnp.asarray(x["pooled"]),
    jnp.asarray(x["t"]),
  )
  return np.asarray(sampling.unpack_tokens(v, H // 2, W // 2)).transpose(
    0, 3, 1, 2
  )


def theirs(model, x):
  with torch.no_grad():
    return model(
      hidden_states=torch.from_numpy(x["latent"]),
      encoder_hidden_states=torch.from_numpy(x["context"]),
      pooled_projections=torch.from_numpy(x["pooled"]),
      timestep=torch.from_numpy(x["t"] * 1000),
      return_dict=False,
    )[0].numpy()


def rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_targets_cover_every_block_linear(files):
  names = set(files["paths"])
  for group in ("dual_blocks", "joint_blocks"):
    for stream in ("context_block", "x_block"):
      for leaf in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"):
        assert f"{group}/{stream}/{leaf}" in names
  assert "dual_blocks/x_block/attn2/qkv" in names
  assert "last_block/context_block/attn/qkv" in names
  assert "last_block/x_block/mlp/fc2" in names
  assert not any("adaLN" in n or "embedder" in n for n in names)


def test_pipeline_load_lora_weights_matches_ours(files):
  ref = ours(files["model"], files["x"])
  model = diffusers.SD3Transformer2DModel.from_pretrained(
    str(files["tmp"] / "base" / "transformer")
  ).eval()
  base_out = theirs(model, files["x"])
  pipe = diffusers.StableDiffusion3Pipeline(
    transformer=model,
    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    vae=None,
    text_encoder=None,
    tokenizer=None,
    text_encoder_2=None,
    tokenizer_2=None,
    text_encoder_3=None,
    tokenizer_3=None,
  )
  pipe.load_lora_weights(str(files["tmp"] / "lora"))  # finds it by name
  src = TensorSource.from_files(files["lora"])
  keys = list(src)
  assert keys and all(
    k.startswith("transformer.") and ".lora_" in k for k in keys
  )
  assert "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight" in keys
  assert rel_err(theirs(model, files["x"]), ref) <= 1e-5
  assert rel_err(base_out, ref) > 1e-2  # the adapters matter


def test_merged_export_loads_in_diffusers(files):
  ref = ours(files["model"], files["x"])
  model = diffusers.SD3Transformer2DModel.from_pretrained(
    str(files["tmp"] / "merged" / "transformer")
  ).eval()
  assert rel_err(theirs(model, files["x"]), ref) <= 1e-5
