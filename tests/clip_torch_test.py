"""CLIP towers: parity with transformers and OpenCLIP (torch references).

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
import importlib.machinery
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clip_common import (  # noqa: F401 - shared test helpers
  EOS,
  TEXT,
  TINY,
  VISION,
  assert_bytes_equal,
  error_of,
  make_ids,
  make_pixels,
  outputs,
  random_model,
  rel_err,
  run,
  tensors,
)
from flax import nnx

from leapalign_jax.convert import (
  ConversionError,
  clip_keys,
  export_clip,
  load_clip,
)
from leapalign_jax.convert import clip as cclip
from leapalign_jax.convert.keymap import expected_sources
from leapalign_jax.models import clip

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
  return expected_sources(clip_keys.rules(clip.VARIANTS[name], layout))


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
    for stub_name, stub in stubs.items():
      # importlib.util.find_spec (run by libraries imported meanwhile)
      # raises on a module without a spec.
      stub.__spec__ = importlib.machinery.ModuleSpec(stub_name, None)
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
