"""T5 v1.1 encoder: parity with transformers, conversion, errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from leapalign_jax.convert import ConversionError, export_t5, load_t5
from leapalign_jax.convert import t5 as ct5
from leapalign_jax.convert.keymap import expected_sources
from leapalign_jax.convert.safetensors_io import TensorSource, save_file
from leapalign_jax.models import t5

# Tiny, but with a short max distance so that 40 tokens reach every bucket
# branch: exact (< 8), logarithmic, and clamped (>= 20), in both directions.
TINY = t5.T5EncoderConfig(
  vocab_size=96,
  d_model=32,
  d_kv=8,
  d_ff=48,
  num_layers=2,
  num_heads=4,
  relative_attention_max_distance=20,
)
LENGTH = 40


def make_ids(batch=2, length=LENGTH, seed=0):
  """Flux-style: words, ``</s>`` (1), then pad (0) up to max length."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, length), np.int32)
  for b, n in enumerate((7, 25)[:batch]):
    ids[b, :n] = rng.integers(3, 96, n)
    ids[b, n] = 1
  return ids


def random_model(config, seed=0, scale=0.2):
  """A model with random parameters everywhere (norm scales around 1).

  Filled from numpy on the abstract model: no per-shape XLA compilation.
  """
  abstract = nnx.eval_shape(lambda: t5.T5Encoder(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  rng = np.random.default_rng(seed)
  for path, x in flat.items():
    value = scale * rng.standard_normal(x.shape).astype(np.float32)
    flat[path] = jnp.asarray(value + (path[-1] == "scale"))
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  return nnx.merge(graphdef, state)


@nnx.jit
def encode(model, ids, mask):
  return model(ids, mask)


def run(model, ids=None, mask=None):
  ids = make_ids() if ids is None else ids
  mask = None if mask is None else jnp.asarray(mask)
  return np.asarray(encode(model, jnp.asarray(ids), mask))


def rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def tensors(path):
  src = TensorSource.from_files([path])
  return {k: np.array(src[k]) for k in src}


def error_of(fn):
  with pytest.raises(ConversionError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg
  return msg


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("t5") / "text_encoder_2")
  export_t5(random_model(TINY), path)
  return path


def test_buckets_match_the_closed_form():
  """Bucket edges of T5's 32 buckets / 128 distance, from its definition."""
  b = t5.relative_position_buckets(300, 32, 128)
  offsets = np.arange(300)  # key - query for query 0 (positive: bucket + 16)
  row = b[0] - 16
  assert list(row[1:8]) == list(range(1, 8))  # exact below 8
  # log-spaced: 8 + floor(log(d / 8) / log(16) * 8) up to 15
  want = np.minimum(
    8 + np.floor(np.log(offsets[8:] / 8) / np.log(16) * 8), 15
  ).astype(int)
  assert list(row[8:]) == list(want)
  assert b[5, 0] == 5 and b[0, 0] == 0  # negative offsets: no +16
  assert b.max() == 31 and b.dtype == np.int32


def test_round_trip_is_byte_exact(hf_dir, tmp_path):
  config, model = load_t5(hf_dir)
  assert config == TINY
  out = str(tmp_path / "again")
  export_t5(model, out)
  a = tensors(os.path.join(out, "model.safetensors"))
  b = tensors(os.path.join(hf_dir, "model.safetensors"))
  assert sorted(a) == sorted(b) and len(a) == 2 + 9 * TINY.num_layers + 1
  assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_scan_loop_remat_mask_and_grad(hf_dir):
  _, scanned = load_t5(hf_dir)
  _, looped = load_t5(hf_dir, scan_layers=False)
  _, remat = load_t5(hf_dir, remat="dots")
  a = run(scanned)
  assert rel_err(run(looped), a) <= 2e-6
  mask = (np.arange(LENGTH)[None] <= np.array([[7], [25]])).astype(np.int32)
  masked = run(scanned, mask=mask)
  assert rel_err(run(scanned, mask=np.ones_like(mask)), a) <= 1e-6
  assert rel_err(masked, a) > 1e-3  # padding tokens do matter without a mask

  def loss(model, ids):
    return jnp.sum(model(ids) ** 2)

  ids = jnp.asarray(make_ids())
  g = jax.tree.leaves(nnx.jit(nnx.grad(loss))(scanned, ids))
  g_remat = jax.tree.leaves(nnx.jit(nnx.grad(loss))(remat, ids))
  assert all(
    rel_err(np.asarray(x), np.asarray(y)) <= 1e-5 for x, y in zip(g_remat, g)
  )


def test_sharded_folder_pipeline_root_and_cli(hf_dir, tmp_path):
  _, model = load_t5(hf_dir)
  root = tmp_path / "pipe"
  files = export_t5(model, str(root / "text_encoder_2"), max_shard_bytes=20_000)
  assert len(files) > 2 and "model-00001-of-" in files[0]
  assert os.path.isfile(
    root / "text_encoder_2" / "model.safetensors.index.json"
  )
  _, again = load_t5(str(root))
  assert np.array_equal(run(again), run(model))
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  r = subprocess.run(
    [sys.executable, "-m", "leapalign_jax.convert", "t5", "--src", str(root)]
    + ["--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16"],
    capture_output=True,
    text=True,
    env=env,
  )
  assert r.returncode == 0, r.stderr
  _, bf16 = load_t5(str(tmp_path / "bf16"), dtype="bfloat16")
  assert bf16.shared.embedding.dtype == jnp.bfloat16
  # The CLI rounded every weight to bf16 once, and nothing else.
  a = jax.tree.leaves(nnx.state(bf16, nnx.Param))
  b = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(np.array_equal(x, y.astype(jnp.bfloat16)) for x, y in zip(a, b))
  assert np.all(np.isfinite(run(bf16)))


def test_embedding_key_variants(hf_dir, tmp_path):
  """Full T5 checkpoints: embed_tokens as well as shared, a decoder."""
  t = tensors(os.path.join(hf_dir, "model.safetensors"))
  _, ref = load_t5(hf_dir)
  only_embed = dict(t)
  only_embed["encoder.embed_tokens.weight"] = only_embed.pop("shared.weight")
  p = str(tmp_path / "a.safetensors")
  save_file(only_embed, p)
  # Without config.json the max distance is T5's 128; ours is 20.
  assert load_t5(p)[0].relative_attention_max_distance == 128
  _, m = load_t5(p, config=TINY)
  assert np.array_equal(run(m), run(ref))
  full = dict(t, **{"encoder.embed_tokens.weight": t["shared.weight"]})
  full["decoder.final_layer_norm.weight"] = np.ones(32, np.float32)
  full["lm_head.weight"] = t["shared.weight"]
  prefixed = {
    f"text_encoders.t5xxl.transformer.{k}": v for k, v in full.items()
  }
  p = str(tmp_path / "b.safetensors")
  save_file(prefixed, p)
  _, m = load_t5(p, config=TINY)
  assert np.array_equal(run(m), run(ref))


def test_errors(hf_dir, tmp_path):
  t = tensors(os.path.join(hf_dir, "model.safetensors"))

  def variant(fn):
    d = dict(t)
    fn(d)
    p = str(tmp_path / f"v{len(os.listdir(tmp_path))}.safetensors")
    save_file(d, p)
    return p

  key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
  msg = error_of(lambda: load_t5(variant(lambda d: d.pop(key))))
  assert "missing" in msg and key in msg
  extra = variant(
    lambda d: d.__setitem__("encoder.extra", np.zeros(1, np.float32))
  )
  msg = error_of(lambda: load_t5(extra))
  assert "unexpected" in msg and "encoder.extra" in msg
  o = "encoder.block.0.layer.0.SelfAttention.o.weight"
  msg = error_of(
    lambda: load_t5(variant(lambda d: d.__setitem__(o, d[o][:, :-8])))
  )
  assert "wrong shape" in msg and o in msg
  wi = "encoder.block.0.layer.1.DenseReluDense.wi"
  relu = variant(
    lambda d: d.__setitem__(f"{wi}.weight", d.pop(f"{wi}_0.weight"))
  )
  assert "v1.1" in error_of(lambda: load_t5(relu))
  assert "do not fit" in error_of(lambda: load_t5(hf_dir, config="xxl"))
  assert "unknown T5 variant" in error_of(lambda: load_t5(hf_dir, config="xl"))
  p = str(tmp_path / "clip.safetensors")
  save_file({"text_model.x": np.zeros(1, np.float32)}, p)
  assert "no T5 encoder weights" in error_of(lambda: load_t5(p))
  folder = tmp_path / "cfg"
  folder.mkdir()
  save_file(t, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps({"feed_forward_proj": "relu"}))
  assert "gated-gelu" in error_of(lambda: load_t5(str(folder)))


# ----------------------------------------------------- torch references ---


@pytest.fixture(scope="module")
def hf_ref(tmp_path_factory):
  torch = pytest.importorskip("torch")
  import transformers as tf

  torch.manual_seed(0)
  cfg = tf.T5Config(
    vocab_size=TINY.vocab_size,
    d_model=TINY.d_model,
    d_kv=TINY.d_kv,
    d_ff=TINY.d_ff,
    num_layers=TINY.num_layers,
    num_heads=TINY.num_heads,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
  )
  model = tf.T5EncoderModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # RMSNorm scales around 1, everything else O(0.2) (random, not init).
      p.copy_(0.2 * torch.randn_like(p) + (1.0 if "layer_norm" in name else 0))
  tmp = tmp_path_factory.mktemp("ref")
  model.save_pretrained(tmp / "t5")
  model.save_pretrained(tmp / "sharded", max_shard_size="20KB")
  return dict(model=model, tmp=tmp)


def torch_forward(model, ids, mask=None):
  import torch

  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=None if mask is None else torch.from_numpy(mask),
    )
  return out.last_hidden_state.numpy()


@pytest.mark.torch
def test_transformers_parity_padded_no_mask(hf_ref):
  """Flux's use: max-length padding, no mask; batch 2."""
  config, model = load_t5(str(hf_ref["tmp"] / "t5"))
  assert config.relative_attention_max_distance == 20  # from config.json
  ids = make_ids()
  assert rel_err(run(model, ids), torch_forward(hf_ref["model"], ids)) <= 1e-5


@pytest.mark.torch
def test_transformers_parity_with_mask_and_shards(hf_ref):
  files = os.listdir(hf_ref["tmp"] / "sharded")
  assert "model.safetensors.index.json" in files
  _, model = load_t5(str(hf_ref["tmp"] / "sharded"))
  ids = make_ids()
  mask = (ids != 0).astype(np.int64)
  mask[:, 0] = 1
  want = torch_forward(hf_ref["model"], ids, mask)
  assert rel_err(run(model, ids, mask), want) <= 1e-5


@pytest.mark.torch
def test_export_loads_in_transformers_and_pickles(hf_ref, tmp_path):
  import torch
  import transformers as tf

  _, model = load_t5(str(hf_ref["tmp"] / "t5"))
  export_t5(model, str(tmp_path / "out"))
  again, info = tf.T5EncoderModel.from_pretrained(
    str(tmp_path / "out"), output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids = make_ids()
  want = torch_forward(hf_ref["model"], ids)
  assert rel_err(torch_forward(again.eval(), ids), want) <= 1e-7
  # A folder with a pickled state dict (.bin), read through weights_only.
  folder = tmp_path / "bin"
  folder.mkdir()
  torch.save(hf_ref["model"].state_dict(), folder / "pytorch_model.bin")
  shutil.copy(hf_ref["tmp"] / "t5" / "config.json", folder)
  _, from_bin = load_t5(str(folder))
  assert rel_err(run(from_bin, ids), want) <= 1e-5
  # bf16 tensors in a pickle are reinterpreted, not converted through fp32.
  sd16 = {k: v.bfloat16() for k, v in hf_ref["model"].state_dict().items()}
  torch.save({"state_dict": sd16}, folder / "pytorch_model.bin")
  _, from_bf16 = load_t5(str(folder), dtype="bfloat16", param_dtype="float32")
  a = jax.tree.leaves(nnx.state(from_bf16, nnx.Param))
  b = jax.tree.leaves(nnx.state(from_bin, nnx.Param))
  assert all(np.array_equal(x, y.astype(jnp.bfloat16)) for x, y in zip(a, b))


@pytest.mark.torch
def test_buckets_match_transformers():
  torch = pytest.importorskip("torch")
  from transformers.models.t5.modeling_t5 import T5Attention

  for length, buckets, dist in ((512, 32, 128), (LENGTH, 32, 20)):
    pos = torch.arange(length)
    rel = pos[None, :] - pos[:, None]
    want = T5Attention._relative_position_bucket(
      rel, bidirectional=True, num_buckets=buckets, max_distance=dist
    ).numpy()
    got = t5.relative_position_buckets(length, buckets, dist)
    np.testing.assert_array_equal(got, want)


@pytest.mark.torch
def test_xxl_param_count_matches_transformers_on_meta():
  torch = pytest.importorskip("torch")
  import transformers as tf

  with torch.device("meta"):
    ref = tf.T5EncoderModel(
      tf.T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
      )
    )
  want = sum(p.numel() for p in ref.parameters())
  abstract = nnx.eval_shape(
    lambda: t5.T5Encoder(t5.VARIANTS["xxl"], rngs=nnx.Rngs(0))
  )
  got = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert got == want == 4_762_310_656
  # The key table names exactly the saved tensors (the tied encoder copy of
  # the embedding is not saved), with their shapes.
  table = expected_sources(ct5.hf_rules(t5.VARIANTS["xxl"]))
  saved = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  saved.pop("encoder.embed_tokens.weight")
  assert table == saved and len(table) == 219
