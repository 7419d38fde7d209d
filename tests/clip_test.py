"""CLIP towers: parity with transformers and OpenCLIP, conversion, errors.

The OpenCLIP reference is open_clip's own model code (``open_clip.model`` /
``open_clip.transformer`` of open-clip-torch 3.3.0, installed with
``--no-deps``). ``import open_clip`` runs the package ``__init__``, which
imports torchvision (not installable beside torch 2.13.0), so the modules are
loaded under a private package whose ``__path__`` is the installed folder;
the package ``__init__`` never runs. The one torchvision symbol that
``open_clip.utils`` imports at module level (``FrozenBatchNorm2d``, used only
to freeze ResNet BatchNorms) is stubbed for the duration of that import.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from leapalign_jax.convert import ConversionError, export_clip, load_clip
from leapalign_jax.convert import clip as cclip
from leapalign_jax.convert.keymap import expected_sources
from leapalign_jax.convert.safetensors_io import TensorSource, save_file
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


@pytest.fixture(scope="module")
def ours():
  return random_model(TINY)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, ours):
  path = str(tmp_path_factory.mktemp("hf") / "clip")
  export_clip(ours, path)
  return path


# ------------------------------------------------------------ no torch ---


def test_pooling_rules(ours):
  """First-eos and argmax pooling pick different tokens when id 127 > eos."""
  ids = make_ids()
  out = run(ours, ids)
  eos_pos = (ids == EOS).argmax(-1)
  want = out["text_hidden"][np.arange(2), eos_pos]
  np.testing.assert_array_equal(out["text_pooled"], want)
  legacy_text = clip.CLIPTextConfig(**{**TEXT.__dict__, "eos_token_id": None})
  legacy = random_model(clip.CLIPConfig(legacy_text, None, None))
  nnx.update(legacy.text_model, nnx.state(ours.text_model, nnx.Param))
  out = run(legacy, ids)
  want = out["text_hidden"][[0, 1], [4, 2]]  # the argmax positions
  np.testing.assert_array_equal(out["text_pooled"], want)


def test_hf_round_trip_is_byte_exact(hf_dir, ours, tmp_path):
  config, model = load_clip(hf_dir)
  assert config.text == TEXT and config.vision == VISION
  assert config.projection_dim == 16 and config.has_logit_scale
  out = str(tmp_path / "again")
  export_clip(model, out)
  assert_bytes_equal(
    tensors(os.path.join(out, "model.safetensors")),
    tensors(os.path.join(hf_dir, "model.safetensors")),
  )
  a, b = run(model), run(ours)
  assert all(np.array_equal(a[k], b[k]) for k in b)


def test_openclip_layout_round_trip(hf_dir, tmp_path):
  _, model = load_clip(hf_dir)
  path = str(tmp_path / "oc.safetensors")
  export_clip(model, path, layout="openclip")
  src = tensors(path)
  assert src["visual.proj"].shape == (48, 16)  # [width, dim]: x @ proj
  assert src["transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
  _, again = load_clip(path, config=TINY)
  a = jax.tree.leaves(nnx.state(model, nnx.Param))
  b = jax.tree.leaves(nnx.state(again, nnx.Param))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  export_clip(again, str(tmp_path / "oc2.safetensors"), layout="openclip")
  assert_bytes_equal(tensors(str(tmp_path / "oc2.safetensors")), src)


def test_tower_subsets(hf_dir, ours):
  config, text_only = load_clip(hf_dir, towers=("text",))
  assert config.vision is None and text_only.logit_scale is None
  np.testing.assert_array_equal(
    run(text_only)["text_embeds"], run(ours)["text_embeds"]
  )
  plain = clip.CLIPConfig(TEXT, None, None)
  _, pooled_only = load_clip(hf_dir, config=plain)
  assert pooled_only.text_projection is None
  with pytest.raises(ValueError, match="project=False"):
    pooled_only.text_features(jnp.asarray(make_ids()))
  _, vision_only = load_clip(hf_dir, towers=["vision"])
  assert vision_only.text_model is None
  with pytest.raises(ValueError, match="without its text tower"):
    vision_only.encode_text(jnp.asarray(make_ids()))


def test_scan_loop_remat_and_grad(hf_dir):
  _, scanned = load_clip(hf_dir)
  _, looped = load_clip(hf_dir, scan_layers=False)
  _, remat = load_clip(hf_dir, remat="full")
  a, b = run(scanned), run(looped)
  assert all(rel_err(a[k], b[k]) <= 2e-6 for k in a)

  def loss(pixels, model):
    return jnp.sum(model.image_features(pixels) ** 2)

  x = jnp.asarray(make_pixels(), jnp.float32)
  g_plain = jax.jit(jax.grad(loss))(x, scanned)
  g_remat = jax.jit(jax.grad(loss))(x, remat)
  assert np.all(np.isfinite(g_remat))
  assert rel_err(np.asarray(g_remat), np.asarray(g_plain)) <= 1e-5


def test_bf16_compute_is_close(hf_dir):
  _, f32 = load_clip(hf_dir)
  _, bf16 = load_clip(hf_dir, dtype="bfloat16", param_dtype="float32")
  a, b = run(f32), run(bf16)
  assert b["image_embeds"].dtype == np.float32
  assert rel_err(b["image_embeds"], a["image_embeds"]) < 0.05


def test_cli_streams_between_layouts(hf_dir, tmp_path):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  run_cli = lambda *a: subprocess.run(  # noqa: E731
    [sys.executable, "-m", "leapalign_jax.convert", "clip", *a],
    capture_output=True,
    text=True,
    env=env,
  )
  oc = str(tmp_path / "oc.safetensors")
  r = run_cli("--src", hf_dir, "--dst", oc, "--layout", "openclip")
  assert r.returncode == 0, r.stderr
  # Head counts are not in an OpenCLIP file: widths 32/48 are not a known
  # model's and not multiples of 64, so going back needs a config.
  r = run_cli("--src", oc, "--dst", str(tmp_path / "back"))
  assert r.returncode == 2 and "head count" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  r = run_cli("--src", hf_dir, "--dst", str(tmp_path / "t"), "--towers", "text")
  assert r.returncode == 0, r.stderr
  config, _ = load_clip(str(tmp_path / "t"))
  assert config.vision is None and config.text == TEXT


# --------------------------------------------------------------- errors ---


def rewrite(hf_dir, dst, fn):
  t = tensors(os.path.join(hf_dir, "model.safetensors"))
  fn(t)
  save_file(t, dst)
  return dst


def test_missing_unexpected_and_misshaped_keys(hf_dir, tmp_path):
  key = "vision_model.encoder.layers.1.self_attn.k_proj.bias"
  p = rewrite(hf_dir, str(tmp_path / "m.safetensors"), lambda t: t.pop(key))
  msg = error_of(lambda: load_clip(p, config=TINY))
  assert "missing" in msg and key in msg
  p = rewrite(
    hf_dir,
    str(tmp_path / "u.safetensors"),
    lambda t: t.__setitem__("text_model.extra", np.zeros(2, np.float32)),
  )
  msg = error_of(lambda: load_clip(p, config=TINY))
  assert "unexpected" in msg and "text_model.extra" in msg

  def shrink(t):
    w = "text_model.encoder.layers.0.mlp.fc2.weight"
    t[w] = t[w][:, :-1]

  p = rewrite(hf_dir, str(tmp_path / "s.safetensors"), shrink)
  msg = error_of(lambda: load_clip(p, config=TINY))
  assert "wrong shape" in msg and "mlp.fc2.weight" in msg


def test_legacy_buffers_and_repack_prefixes(hf_dir, ours, tmp_path):
  """Old transformers saved position_ids; single-file repacks add a prefix."""
  t = tensors(os.path.join(hf_dir, "model.safetensors"))
  t["text_model.embeddings.position_ids"] = np.arange(16)[None]
  t["vision_model.embeddings.position_ids"] = np.arange(17)[None]
  p = str(tmp_path / "clip_l.safetensors")
  save_file(
    {f"text_encoders.clip_l.transformer.{k}": v for k, v in t.items()}, p
  )
  _, model = load_clip(p, config=TINY)
  a = jax.tree.leaves(nnx.state(model, nnx.Param))
  b = jax.tree.leaves(nnx.state(ours, nnx.Param))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_config_and_tower_mismatches(hf_dir, tmp_path):
  msg = error_of(lambda: load_clip(hf_dir, config="vit-l-14"))
  assert "do not fit" in msg and "hidden_size" in msg
  assert "unknown CLIP variant" in error_of(
    lambda: load_clip(hf_dir, config="vit-z")
  )
  _, text_only = load_clip(hf_dir, towers=("text",))
  path = str(tmp_path / "text")
  export_clip(text_only, path)
  msg = error_of(lambda: load_clip(path, towers=("vision",)))
  assert "has no vision tower" in msg
  assert "subset" in error_of(lambda: load_clip(hf_dir, towers=("audio",)))
  model = random_model(clip.CLIPConfig(TEXT, VISION, None))
  assert "separately" in error_of(
    lambda: export_clip(model, str(tmp_path / "x"))
  )


def test_files_that_are_not_clip(tmp_path):
  p = str(tmp_path / "other.safetensors")
  save_file({"encoder.block.0.x": np.zeros(2, np.float32)}, p)
  assert "no CLIP weights" in error_of(lambda: load_clip(p))
  assert "no such file" in error_of(lambda: load_clip(str(tmp_path / "no")))
  weird = tmp_path / "w.npz"
  weird.write_bytes(b"x")
  assert "unknown weight file type" in error_of(lambda: load_clip(str(weird)))
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "not a diffusers/transformers" in error_of(
    lambda: load_clip(str(empty))
  )


def test_pickles_without_torch(tmp_path, monkeypatch):
  p = tmp_path / "x.pt"
  p.write_bytes(b"not a pickle")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  msg = error_of(lambda: load_clip(str(p)))
  assert "needs torch" in msg and "torch==2.13.0" in msg


# ----------------------------------------------------- torch references ---


def torch_only(fn):
  """Marks a torch parity test; skips it where torch is not installed."""
  has_torch = importlib.util.find_spec("torch") is not None
  return pytest.mark.torch(
    pytest.mark.skipif(not has_torch, reason="torch")(fn)
  )


def hf_tiny(kind, eos=EOS, act="quick_gelu", seed=0):
  """A random tiny transformers CLIP model (LayerNorm affine included)."""
  import torch
  import transformers as tf

  text = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act=act,
    bos_token_id=125,
    eos_token_id=eos,
    pad_token_id=0,
  )
  vision = dict(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
    hidden_act=act,
  )
  torch.manual_seed(seed)
  if kind == "clip":
    cfg = tf.CLIPConfig(
      text_config=text, vision_config=vision, projection_dim=16
    )
    model = tf.CLIPModel(cfg)
  elif kind == "text":
    model = tf.CLIPTextModel(tf.CLIPTextConfig(**text))
  else:
    model = tf.CLIPVisionModelWithProjection(
      tf.CLIPVisionConfig(**vision, projection_dim=16)
    )
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(0.2 * torch.randn_like(p) + (1.0 if p.ndim == 1 else 0.0))
  return model.eval()


def hf_outputs(model, ids, pixels):
  import torch

  out = {}
  with torch.no_grad():
    ids_t = None if ids is None else torch.from_numpy(ids).long()
    pix_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float()
    is_text = type(model).__name__ == "CLIPTextModel"  # a tower in itself
    text = model if is_text else getattr(model, "text_model", None)
    if text is not None:
      o = text(input_ids=ids_t)
      out.update(text_hidden=o.last_hidden_state, text_pooled=o.pooler_output)
      if hasattr(model, "text_projection"):
        out["text_embeds"] = model.text_projection(o.pooler_output)
    vision = getattr(model, "vision_model", None)
    if vision is not None:
      o = vision(pixel_values=pix_t)
      out.update(image_hidden=o.last_hidden_state, image_pooled=o.pooler_output)
      out["image_embeds"] = model.visual_projection(o.pooler_output)
  return {k: v.numpy() for k, v in out.items()}


def assert_parity(ours_out, ref_out, tol=1e-5):
  assert set(ref_out) <= set(ours_out)
  errs = {k: rel_err(ours_out[k], ref_out[k]) for k in ref_out}
  assert max(errs.values()) <= tol, errs
  return errs


@torch_only
@pytest.mark.parametrize("eos", [EOS, 2], ids=["first_eos", "legacy_argmax"])
def test_transformers_clip_model(tmp_path, eos):
  import transformers as tf

  ref = hf_tiny("clip", eos=eos)
  ref.save_pretrained(tmp_path / "ref")
  ids = make_ids() if eos == EOS else make_ids(eos=127, pad=127)
  pixels = make_pixels()
  config, model = load_clip(str(tmp_path / "ref"))
  assert config.text.eos_token_id == (None if eos == 2 else eos)
  want = hf_outputs(ref, ids, pixels)
  assert_parity(run(model, ids, pixels), want)
  assert float(model.logit_scale[...]) == float(ref.logit_scale.detach())
  # Our export loads back into transformers with every key used.
  export_clip(model, str(tmp_path / "ours"))
  again, info = tf.CLIPModel.from_pretrained(
    str(tmp_path / "ours"), output_loading_info=True
  )
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys"))
  assert_parity(hf_outputs(again.eval(), ids, pixels), want, 1e-7)


@torch_only
def test_flux_clip_text_encoder(tmp_path):
  """Flux's text_encoder/: CLIPTextModel, pooled output without projection.

  transformers 5 saves this class without the ``text_model.`` prefix (older
  versions, as in the Flux repo, with it); both are read. The pipeline root
  is accepted too.
  """
  ref = hf_tiny("text", eos=2)
  ref.save_pretrained(tmp_path / "pipe" / "text_encoder")
  config, model = load_clip(str(tmp_path / "pipe"))
  assert config.vision is None and config.projection_dim is None
  ids = make_ids(eos=127, pad=127)  # Flux pads with the eos id
  want = hf_outputs(ref, ids, make_pixels())
  assert_parity(run(model, ids), want)
  pooled = np.asarray(model.text_features(jnp.asarray(ids), project=False))
  assert rel_err(pooled, want["text_pooled"]) <= 1e-5


@torch_only
def test_vision_model_with_projection(tmp_path):
  ref = hf_tiny("vision", act="gelu")
  ref.save_pretrained(tmp_path / "v")
  config, model = load_clip(str(tmp_path / "v"))
  assert config.text is None and config.vision.hidden_act == "gelu"
  pixels = make_pixels()
  assert_parity(run(model, pixels=pixels), hf_outputs(ref, None, pixels))


def ours_count(name):
  abstract = nnx.eval_shape(
    lambda: clip.CLIP(clip.VARIANTS[name], rngs=nnx.Rngs(0))
  )
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def torch_count(model):
  return sum(p.numel() for p in model.parameters())


def table(name, layout):
  """Our full-size key table: ``{source key: shape}``."""
  return expected_sources(cclip.rules(clip.VARIANTS[name], layout))


def state_shapes(model, prefix=""):
  return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


@torch_only
def test_sizes_match_transformers_on_meta():
  """CLIP-L text and laion ViT-H-14 by shape, vs transformers on meta.

  Parameter counts agree, and the key tables name exactly the tensors (and
  shapes) the reference classes save.
  """
  import torch
  import transformers as tf

  with torch.device("meta"):
    l14_text = tf.CLIPTextModel(
      tf.CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
      )
    )
    h14 = tf.CLIPModel(
      tf.CLIPConfig(
        text_config=dict(
          hidden_size=1024,
          intermediate_size=4096,
          num_attention_heads=16,
          num_hidden_layers=24,
        ),
        vision_config=dict(
          hidden_size=1280,
          intermediate_size=5120,
          num_attention_heads=16,
          num_hidden_layers=32,
          patch_size=14,
        ),
        projection_dim=1024,
      )
    )
  assert ours_count("vit-l-14-text") == torch_count(l14_text) == 123_060_480
  assert ours_count("vit-h-14") == torch_count(h14) == 986_109_441
  assert table("vit-l-14-text", "hf") == state_shapes(l14_text, "text_model.")
  assert table("vit-h-14", "hf") == state_shapes(h14)


@torch_only
def test_sizes_match_open_clip_vit_h_14_on_meta():
  """The OpenCLIP ViT-H-14 class (HPSv2.1's architecture) on meta."""
  import torch

  oc = open_clip_modules()
  with torch.device("meta"):
    h14 = oc.CLIP(
      embed_dim=1024,
      vision_cfg=oc.CLIPVisionCfg(
        image_size=224, layers=32, width=1280, head_width=80, patch_size=14
      ),
      text_cfg=oc.CLIPTextCfg(width=1024, heads=16, layers=24),
    )
  assert ours_count("vit-h-14") == torch_count(h14)
  assert table("vit-h-14", "openclip") == state_shapes(h14)
  assert len(table("vit-h-14", "openclip")) == 686


# ------------------------------------------------------------- OpenCLIP ---


def open_clip_modules():
  """open_clip's ``model`` module, loaded without the package ``__init__``."""
  name = "_open_clip_reference"
  if f"{name}.model" in sys.modules:
    return sys.modules[f"{name}.model"]
  spec = importlib.util.find_spec("open_clip")  # locates; runs nothing
  if spec is None or not spec.submodule_search_locations:
    pytest.skip(
      "needs open-clip-torch: pip install --no-deps open-clip-torch==3.3.0"
    )
  package = types.ModuleType(name)
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules[name] = package
  stubs = {}
  if importlib.util.find_spec("torchvision") is None:
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    stubs = {
      "torchvision": types.ModuleType("torchvision"),
      "torchvision.ops": types.ModuleType("torchvision.ops"),
      "torchvision.ops.misc": misc,
    }
  saved = {k: sys.modules.get(k) for k in stubs}
  sys.modules.update(stubs)
  try:
    return importlib.import_module(f"{name}.model")
  finally:
    for k, v in saved.items():  # no fake torchvision outlives the import
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


OC_CONFIG = clip.CLIPConfig(
  clip.CLIPTextConfig(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=12,
    hidden_act="gelu",
  ),
  clip.CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
    hidden_act="gelu",
  ),
  16,
)


@pytest.fixture(scope="module")
def open_clip_ref(tmp_path_factory):
  import torch
  from safetensors.torch import save_file as torch_save_file

  oc = open_clip_modules()
  torch.manual_seed(0)
  model = oc.CLIP(
    embed_dim=16,
    vision_cfg=oc.CLIPVisionCfg(
      layers=2, width=32, head_width=16, patch_size=4, image_size=16
    ),
    text_cfg=oc.CLIPTextCfg(
      context_length=12, vocab_size=100, width=32, heads=4, layers=2
    ),
    quick_gelu=False,  # HPSv2.1's ViT-H-14: exact GELU
  ).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(0.2 * torch.randn_like(p) + (1.0 if p.ndim == 1 else 0.0))
  rng = np.random.default_rng(3)
  ids = rng.integers(1, 90, (2, 12))
  ids[0, 5:], ids[1, 9:] = 0, 0  # OpenCLIP pads with 0 after the eot
  ids[0, 4], ids[1, 8] = 99, 99  # eot = the largest id: argmax pooling
  pixels = make_pixels(size=16, seed=4)
  with torch.no_grad():
    want = {
      "text_embeds": model.encode_text(torch.from_numpy(ids)).numpy(),
      "image_embeds": model.encode_image(
        torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float()
      ).numpy(),
    }
  tmp = tmp_path_factory.mktemp("openclip")
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  torch_save_file(sd, str(tmp / "oc.safetensors"))
  torch.save({"epoch": 3, "state_dict": sd}, tmp / "oc.pt")  # HPSv2 style
  return dict(
    tmp=tmp, ids=ids, pixels=pixels, want=want, logit_scale=model.logit_scale
  )


@torch_only
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_openclip_parity(open_clip_ref, fmt):
  r = open_clip_ref
  config, model = load_clip(str(r["tmp"] / f"oc.{fmt}"), config=OC_CONFIG)
  got = run(model, r["ids"], r["pixels"])
  assert_parity(got, r["want"])
  assert config.text.eos_token_id is None  # argmax pooling
  assert float(model.logit_scale[...]) == float(r["logit_scale"].detach())


@torch_only
def test_openclip_detection_and_pickle_errors(open_clip_ref, tmp_path):
  import torch

  r = open_clip_ref
  # Widths of 32 fit no known model and no 64-wide heads: a config is needed.
  msg = error_of(lambda: load_clip(str(r["tmp"] / "oc.pt")))
  assert "head count" in msg and "config=" in msg
  src, layout, _ = cclip.open_checkpoint(str(r["tmp"] / "oc.safetensors"))
  assert layout == "openclip"
  with pytest.raises(ConversionError, match="head count"):
    cclip.infer_config(src, layout)
  # weights_only refuses pickled Python objects.
  bad = tmp_path / "bad.pt"
  torch.save(
    {"state_dict": {"w": torch.zeros(2)}, "fn": types.SimpleNamespace()}, bad
  )
  assert "weights_only" in error_of(lambda: load_clip(str(bad)))
  # Non-tensor entries in the state dict, and truncated archives.
  odd = tmp_path / "odd.pt"
  torch.save({"token_embedding.weight": torch.zeros(2, 2), "step": 3}, odd)
  assert "not tensors" in error_of(lambda: load_clip(str(odd)))
  data = (r["tmp"] / "oc.pt").read_bytes()
  cut = tmp_path / "cut.pt"
  cut.write_bytes(data[: len(data) // 2])
  assert "corrupt or truncated" in error_of(lambda: load_clip(str(cut)))
