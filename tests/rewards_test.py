"""Reward registry: parity with the references, gradients, jit, errors.

References (torch tests): transformers ``CLIPModel`` for ``pickscore`` /
``clip``, open_clip's own ``CLIP`` (imported without torchvision, as in
``clip_test``) for ``hpsv2`` from ``.safetensors`` and ``.pt``, and a torch
``nn.Sequential`` written as the upstream aesthetic ``MLP`` on a transformers
vision tower for ``aesthetic``. The model part is compared on identical
preprocessed pixels (our preprocessing, which ``preprocess_test`` checks
against PIL/torch separately); scores at ≤ 1e-5 relative error in fp32.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from leapalign_jax import rewards, sharding
from leapalign_jax.convert import (
  ConversionError,
  export_aesthetic_head,
  export_clip,
)
from leapalign_jax.models import aesthetic as aesthetic_model
from leapalign_jax.models import clip
from leapalign_jax.rewards import preprocess as pp

# OpenCLIP files do not record head counts: the rewards that read this tiny
# model's OpenCLIP file name it with their ``variant`` option (TINY).
TEXT = clip.CLIPTextConfig(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=256,
  num_hidden_layers=2,
  num_attention_heads=1,
  max_position_embeddings=16,
  hidden_act="gelu",
)
VISION = clip.CLIPVisionConfig(
  hidden_size=128,
  intermediate_size=512,
  num_hidden_layers=2,
  num_attention_heads=2,
  image_size=16,
  patch_size=4,
  hidden_act="gelu",
)
TINY = clip.CLIPConfig(TEXT, VISION, 32)
HEAD = aesthetic_model.AestheticConfig(widths=(32, 24, 8, 6, 4, 1))
EOS, BOS = 127, 126  # the eos is the largest id, as 49407 in OpenAI's BPE


def make_ids(batch=3, length=16, pad=EOS, seed=0):
  """``[BOS, words, EOS, pad...]`` rows of different lengths (one full)."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, length), pad, np.int32)
  for b in range(batch):
    n = length - 2 if b == batch - 1 else 2 + 3 * b
    ids[b, 0] = BOS
    ids[b, 1 : 1 + n] = rng.integers(1, 120, n)
    ids[b, 1 + n] = EOS
  return ids


def make_images(batch=3, h=24, w=40, seed=1):
  """Non-square generator images in [-1, 1] with a small overshoot."""
  rng = np.random.default_rng(seed)
  return rng.uniform(-1.02, 1.02, (batch, h, w, 3)).astype(np.float32)


def randomize(module, seed=0, scale=0.2):
  """Every parameter of ``module`` redrawn from numpy (norm scales ~ 1)."""
  graphdef, state = nnx.split(module)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  rng = np.random.default_rng(seed)
  for path, x in flat.items():
    value = scale * rng.standard_normal(x.shape).astype(np.float32)
    flat[path] = jnp.asarray(value + (path[-1] == "scale"))
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  return nnx.merge(graphdef, state)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def one_line_error(fn, match, cls=ValueError):
  with pytest.raises(cls) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg, msg
  assert match in msg, msg
  return msg


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny CLIP in both layouts and an aesthetic head, saved as files."""
  tmp = tmp_path_factory.mktemp("rewards")
  model = randomize(clip.CLIP(TINY, rngs=nnx.Rngs(0)))
  out = {
    "hf": str(tmp / "clip_hf"),
    "openclip": str(tmp / "clip_oc.safetensors"),
    "head": str(tmp / "head.safetensors"),
    "text_only": str(tmp / "text_only"),
  }
  export_clip(model, out["hf"], layout="hf")
  export_clip(model, out["openclip"], layout="openclip")
  head = aesthetic_model.AestheticHead(HEAD, rngs=nnx.Rngs(1))
  export_aesthetic_head(randomize(head, seed=2, scale=0.5), out["head"])
  text = clip.CLIPConfig(TEXT, None, None)
  export_clip(randomize(clip.CLIP(text, rngs=nnx.Rngs(0))), out["text_only"])
  return out


@pytest.fixture(scope="module")
def all_rewards(files):
  """Every registered reward in one bundle, with distinct weights."""
  return rewards.build(
    {
      "hpsv2": {"weight": 1.0, "path": files["openclip"], "variant": TINY},
      "pickscore": {"weight": 0.5, "path": files["hf"]},
      "clip": {"weight": -2.0, "path": files["hf"], "scale": "clipscore"},
      "aesthetic": {
        "weight": 0.25,
        "path": files["head"],
        "clip_path": files["hf"],
      },
    }
  )


@pytest.fixture(scope="module")
def each_fn(all_rewards):
  return jax.jit(all_rewards.score_each)


# ------------------------------------------------------------ registry ---


def test_registry_and_api(all_rewards):
  assert rewards.names() == (
    "aesthetic",
    "clip",
    "digits_rule",
    "hpsv2",
    "image_reward",
    "pickscore",
    "python",
  )
  r = all_rewards
  assert r.names == ("hpsv2", "pickscore", "clip", "aesthetic")
  assert r.weights == (1.0, 0.5, -2.0, 0.25)
  assert set(r.params) == set(r.names)
  assert r.text_length == TEXT.max_position_embeddings


def test_weighted_sum_and_jit_with_params_as_arguments(all_rewards, each_fn):
  r, x, ids = all_rewards, make_images(), make_ids()
  each = {k: np.asarray(v) for k, v in each_fn(r.params, x, ids).items()}
  assert all(v.shape == (3,) and v.dtype == np.float32 for v in each.values())
  total = np.asarray(jax.jit(r.score)(r.params, x, ids))
  want = sum(w * each[n] for n, w in zip(r.names, r.weights))
  np.testing.assert_allclose(total, want, rtol=1e-6, atol=1e-6)
  # Weight 0: evaluated by score_each, left out of score.
  r0 = rewards.Reward(r.names, (1.0, 0.0, 0.0, 0.0), r.params, r.fns, 16)
  np.testing.assert_allclose(
    np.asarray(jax.jit(r0.score)(r.params, x, ids)), each["hpsv2"], rtol=1e-6
  )


def test_each_reward_reads_its_own_ids(all_rewards, each_fn, files):
  """A weighted sum feeds every reward the ids of its own tokenizer."""
  r, x = all_rewards, make_images()
  assert r.tokenizers == {"hpsv2": "openclip", "pickscore": "hf", "clip": "hf"}
  ids = {n: make_ids(seed=k) for k, n in enumerate(r.tokenizers)}
  got = {k: np.asarray(v) for k, v in each_fn(r.params, x, ids).items()}
  for n in r.tokenizers:  # one array for all: only n's entry is n's ids
    want = np.asarray(each_fn(r.params, x, ids[n])[n])
    np.testing.assert_allclose(got[n], want, rtol=1e-6, atol=1e-7)
  other = np.asarray(each_fn(r.params, x, ids["hpsv2"])["pickscore"])
  assert not np.allclose(got["pickscore"], other)
  total = np.asarray(jax.jit(r.score)(r.params, x, ids))
  want = sum(w * got[n] for n, w in zip(r.names, r.weights))
  np.testing.assert_allclose(total, want, rtol=1e-6, atol=1e-6)
  oc = rewards.get("oc", kind="clip", path=files["openclip"], variant=TINY)
  assert oc.tokenizers == {"oc": "openclip"}  # an OpenCLIP-layout file


def test_embeddings_give_the_scores(all_rewards, each_fn):
  """``embed``: unit embeddings whose dot product is the score."""
  r, x, ids = all_rewards, make_images(), make_ids()
  each = each_fn(r.params, x, ids)
  dots = {}
  for name in ("hpsv2", "pickscore", "clip"):
    img, txt = jax.jit(r.embed, static_argnums=0)(name, r.params, x, ids)
    assert img.shape == txt.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1, rtol=1e-6)
    dots[name] = np.sum(np.asarray(img) * np.asarray(txt), axis=-1)
  np.testing.assert_allclose(dots["hpsv2"], each["hpsv2"], rtol=1e-6)
  scale = np.exp(np.asarray(r.params["pickscore"]["logit_scale"][...]))
  np.testing.assert_allclose(
    scale * dots["pickscore"], each["pickscore"], rtol=1e-5
  )
  np.testing.assert_allclose(
    100 * np.maximum(dots["clip"], 0), each["clip"], rtol=1e-5, atol=1e-5
  )
  one_line_error(
    lambda: r.embed("aesthetic", r.params, x, ids), "gives no embeddings"
  )


def test_gradients_reach_the_images_not_the_params(all_rewards):
  r, x, ids = all_rewards, jnp.asarray(make_images()), jnp.asarray(make_ids())
  for name in r.names:
    fn = lambda p, im, n=name: jnp.sum(r.fns[n](p, im, ids))  # noqa: E731
    g_img, g_par = jax.jit(jax.grad(fn, argnums=(1, 0)))(r.params[name], x)
    g_img = np.asarray(g_img)
    assert np.all(np.isfinite(g_img)), name
    assert np.max(np.abs(g_img)) > 0, name
    # stop_gradient: asking for parameter gradients gives zeros.
    assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(g_par)), name


def test_sharded_and_replicated_params(all_rewards, each_fn):
  r, x, ids = all_rewards, make_images(), make_ids()
  want = each_fn(r.params, x, ids)
  mesh = sharding.make_mesh((1, -1, 1))
  specs = sharding.logical_to_mesh(r.params, mesh, sharding.DEFAULT_RULES)
  sharded = jax.device_put(r.params, specs)
  assert any(
    not a.sharding.is_fully_replicated for a in jax.tree.leaves(sharded)
  )
  replicated = jax.device_put(
    r.params, jax.tree.map(lambda _: sharding.replicated(mesh), r.params)
  )
  for placed in (sharded, replicated):
    got = jax.jit(r.score_each)(placed, x, ids)
    for n in r.names:
      assert rel_err(got[n], want[n]) <= 1e-5, n


def test_text_padding_and_pooling_rule_do_not_matter(files, tmp_path):
  """Argmax pooling vs first-eos pooling (modern transformers configs), and
  eos vs 0 padding: the same scores."""
  import dataclasses

  model_a = randomize(clip.CLIP(TINY, rngs=nnx.Rngs(0)))
  eos_text = dataclasses.replace(TEXT, eos_token_id=EOS)
  path_b = str(tmp_path / "first_eos")
  export_clip(model_a, path_b, config=dataclasses.replace(TINY, text=eos_text))
  x = make_images()
  scores = []
  for path in (files["hf"], path_b):
    r = rewards.get("clip", path=path)
    fn = jax.jit(r.score)
    scores += [np.asarray(fn(r.params, x, make_ids(pad=p))) for p in (EOS, 0)]
  for s in scores[1:]:
    np.testing.assert_allclose(s, scores[0], rtol=1e-6, atol=1e-7)


def test_small_tower_resizes_to_its_image_size(tmp_path):
  """The digits world's tiny CLIP (image_size 32) scores any image size."""
  import dataclasses

  vision = dataclasses.replace(VISION, image_size=32, patch_size=8)
  cfg = dataclasses.replace(TINY, vision=vision)
  path = str(tmp_path / "digits_clip")
  export_clip(randomize(clip.CLIP(cfg, rngs=nnx.Rngs(0))), path)
  r = rewards.get("clip", path=path, scale="logit")
  for h, w in ((32, 32), (48, 80)):
    out = jax.jit(r.score)(r.params, make_images(2, h, w), make_ids(2))
    assert out.shape == (2,) and np.all(np.isfinite(out))


def test_bf16_towers_keep_an_fp32_logit_scale(files):
  r32 = rewards.get("pickscore", path=files["hf"])
  r16 = rewards.get("pickscore", path=files["hf"], dtype="bfloat16")
  ls = r16.params["pickscore"]["logit_scale"][...]
  assert ls.dtype == jnp.float32
  assert float(ls) == float(r32.params["pickscore"]["logit_scale"][...])
  x, ids = make_images(), make_ids()
  a = jax.jit(r32.score)(r32.params, x, ids)
  b = jax.jit(r16.score)(r16.params, x, ids)
  assert rel_err(b, a) < 0.05


def test_scales_and_kinds(files):
  """Three ``clip`` rewards under other names (``kind``), one per scale."""
  scales = ("cosine", "logit", "clipscore")
  r = rewards.build(
    {s: {"kind": "clip", "path": files["hf"], "scale": s} for s in scales}
  )
  assert r.names == scales
  x, ids = make_images(), make_ids()
  out = {
    k: np.asarray(v) for k, v in jax.jit(r.score_each)(r.params, x, ids).items()
  }
  ls = float(r.params["logit"]["logit_scale"][...])
  np.testing.assert_allclose(out["logit"], np.exp(ls) * out["cosine"], 1e-6)
  want = 100 * np.maximum(out["cosine"], 0)
  np.testing.assert_allclose(out["clipscore"], want, 1e-6)


# -------------------------------------------------------------- errors ---


def test_config_errors(files, tmp_path):
  one_line_error(lambda: rewards.get("hps"), "registered: aesthetic, clip")
  one_line_error(
    lambda: rewards.build({"x": {"kind": "imagereward", "path": "a"}}),
    "unknown reward 'imagereward' (rewards.x)",
  )
  one_line_error(lambda: rewards.build({}), "config.rewards is empty")
  one_line_error(lambda: rewards.get("hpsv2"), "rewards.hpsv2.path is empty")
  one_line_error(
    lambda: rewards.get("aesthetic", path=files["head"]),
    "rewards.aesthetic.clip_path is empty",
  )
  one_line_error(
    lambda: rewards.get("hpsv2", path=files["hf"], crop="floor"),
    "unknown option(s) crop",
  )
  one_line_error(
    lambda: rewards.get("pickscore", path=files["hf"], scale="x100"),
    "rewards.pickscore.scale='x100'",
  )
  one_line_error(
    lambda: rewards.get("clip", path=files["hf"], weight="heavy"),
    "rewards.clip.weight='heavy'",
  )
  missing = str(tmp_path / "HPS_v2.1_compressed.pt")
  msg = one_line_error(
    lambda: rewards.get("hpsv2", path=missing), "no such file", ConversionError
  )
  assert msg.startswith("rewards.hpsv2.path: ") and missing in msg


def test_wrong_checkpoint_kinds(files):
  msg = one_line_error(
    lambda: rewards.get("hpsv2", path=files["head"]),
    "holds no CLIP weights",
    ConversionError,
  )
  assert files["head"] in msg
  one_line_error(
    lambda: rewards.get(
      "aesthetic", path=files["openclip"], clip_path=files["hf"]
    ),
    "belong in the reward's clip_path",
    ConversionError,
  )
  one_line_error(
    lambda: rewards.get("pickscore", path=files["text_only"]),
    "has no vision tower",
    ConversionError,
  )
  one_line_error(
    lambda: rewards.get(
      "aesthetic", path=files["head"], clip_path=files["text_only"]
    ),
    "has no vision tower",
    ConversionError,
  )


def test_aesthetic_head_must_fit_the_tower(files, tmp_path):
  head = aesthetic_model.AestheticHead(
    aesthetic_model.AestheticConfig(widths=(768, 16, 8, 4, 2, 1)),
    rngs=nnx.Rngs(0),
  )
  path = str(tmp_path / "l14_head.safetensors")
  export_aesthetic_head(head, path)
  one_line_error(
    lambda: rewards.get("aesthetic", path=path, clip_path=files["hf"]),
    "gives 32-d embeddings but the head",
    ConversionError,
  )


def test_check_images():
  rewards.check_images(np.clip(make_images(), -1.005, 1.005))  # the margin
  one_line_error(lambda: rewards.check_images(make_images()), "[-1.02, 1.02]")
  one_line_error(
    lambda: rewards.check_images(np.full((1, 4, 4, 3), 200.0)), "[0, 255]"
  )
  one_line_error(
    lambda: rewards.check_images(np.full((1, 4, 4, 3), -1.5)), "[-1, 1]"
  )
  bad = make_images()
  bad[0, 0, 0, 0] = np.nan
  one_line_error(lambda: rewards.check_images(bad), "1 non-finite")
  one_line_error(
    lambda: rewards.check_images(np.zeros((4, 4, 3), np.float32)), "NHWC"
  )
  one_line_error(
    lambda: rewards.check_images(np.zeros((1, 4, 4, 3), np.uint8)), "uint8"
  )


# ----------------------------------------------------- torch references ---


def torch_only(fn):
  """Marks a torch parity test; skips it where torch is not installed."""
  has_torch = importlib.util.find_spec("torch") is not None
  return pytest.mark.torch(
    pytest.mark.skipif(not has_torch, reason="torch")(fn)
  )


def torch_randomize(model, seed=0, scale=0.2):
  import torch

  torch.manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(scale * torch.randn_like(p) + (1.0 if p.ndim == 1 else 0.0))
  return model.eval()


def hf_clip(act="gelu", eos=EOS, logit_scale=4.6052):
  """A random tiny transformers CLIPModel (first-eos pooling by default)."""
  import torch
  import transformers as tf

  cfg = tf.CLIPConfig(
    text_config=dict(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
      hidden_act=act,
      bos_token_id=BOS,
      eos_token_id=eos,
      pad_token_id=0,
    ),
    vision_config=dict(
      hidden_size=48,
      intermediate_size=80,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=16,
      patch_size=4,
      hidden_act=act,
    ),
    projection_dim=16,
  )
  model = torch_randomize(tf.CLIPModel(cfg))
  with torch.no_grad():
    model.logit_scale.fill_(logit_scale)  # PickScore_v1's ~ log(100)
  return model


def nchw(pixels_BHWC):
  import torch

  return torch.from_numpy(np.array(pixels_BHWC).transpose(0, 3, 1, 2))


def pooled(out):
  """transformers 5 returns an output object from get_*_features."""
  return out.pooler_output if hasattr(out, "pooler_output") else out


def unit(t):
  return t / t.norm(dim=-1, keepdim=True)


@torch_only
@pytest.mark.parametrize("eos", [EOS, 2], ids=["first_eos", "argmax"])
def test_pickscore_and_clip_match_transformers(tmp_path, eos):
  import torch

  ref = hf_clip(eos=eos)
  ref.save_pretrained(tmp_path / "pickscore")
  x, ids = make_images(), make_ids()
  pixels = pp.clip_preprocess(jnp.asarray(x), size=16)  # PickScore defaults
  with torch.no_grad():
    img = unit(pooled(ref.get_image_features(pixel_values=nchw(pixels))))
    txt = unit(pooled(ref.get_text_features(input_ids=torch.from_numpy(ids))))
    cos = (img * txt).sum(-1)
    want = {
      "pickscore": (ref.logit_scale.exp() * cos).numpy(),
      "cosine": cos.numpy(),
    }
  path = str(tmp_path / "pickscore")
  r = rewards.get("pickscore", path=path)
  got = np.asarray(jax.jit(r.score)(r.params, x, ids))
  assert rel_err(got, want["pickscore"]) <= 1e-5
  # clipscore = 100 * max(cosine, 0) on top of this (test_scales).
  r = rewards.get("clip", path=path)
  got = np.asarray(jax.jit(r.score)(r.params, x, ids))
  assert rel_err(got, want["cosine"]) <= 1e-5


# The tiny model as an OpenCLIP model config (exact GELU, as HPSv2.1's
# ViT-H-14); the reward reads the same dict as its ``variant``.
HPS_CONFIG = dict(
  embed_dim=32,
  vision_cfg=dict(
    layers=2, width=128, head_width=64, patch_size=4, image_size=16
  ),
  text_cfg=dict(context_length=16, vocab_size=128, width=64, heads=1, layers=2),
  quick_gelu=False,
)


@pytest.fixture(scope="module")
def open_clip_hps(tmp_path_factory):
  """A tiny open_clip ``CLIP`` (exact GELU, as HPSv2.1's ViT-H-14)."""
  import torch
  from clip_torch_test import open_clip_modules
  from safetensors.torch import save_file as torch_save_file

  oc = open_clip_modules()
  torch.manual_seed(0)
  model = oc.CLIP(
    embed_dim=32,
    vision_cfg=oc.CLIPVisionCfg(**HPS_CONFIG["vision_cfg"]),
    text_cfg=oc.CLIPTextCfg(**HPS_CONFIG["text_cfg"]),
    quick_gelu=HPS_CONFIG["quick_gelu"],
  )
  model = torch_randomize(model)
  tmp = tmp_path_factory.mktemp("hps")
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  torch_save_file(sd, str(tmp / "hps.safetensors"))
  torch.save({"epoch": 1, "state_dict": sd}, tmp / "HPS_v2.1_compressed.pt")
  return model, tmp


@torch_only
@pytest.mark.parametrize("fmt", ["hps.safetensors", "HPS_v2.1_compressed.pt"])
def test_hpsv2_matches_open_clip(open_clip_hps, fmt):
  import torch

  model, tmp = open_clip_hps
  x, ids = make_images(), make_ids(pad=0)  # open_clip pads with 0
  pixels = pp.hps_preprocess(jnp.asarray(x), size=16)
  with torch.no_grad():
    # HPSv2: model(image, text) normalises both; score = diag(img @ txt.T).
    img, txt, _ = model(nchw(pixels), torch.from_numpy(ids).long())
    want = torch.diagonal(img @ txt.T).numpy()
  r = rewards.get("hpsv2", path=str(tmp / fmt), variant=HPS_CONFIG)
  got = np.asarray(jax.jit(r.score)(r.params, x, make_ids(pad=EOS)))
  assert rel_err(got, want) <= 1e-5


def torch_aesthetic_mlp(widths, relu: bool):
  """The upstream ``MLP.layers`` (Dropouts, and ReLUs for *-reluMSE)."""
  from torch import nn

  (d, h1, h2, h3, h4, _) = widths
  act = [nn.ReLU()] if relu else []
  return nn.Sequential(
    nn.Linear(d, h1),
    *act,
    nn.Dropout(0.2),
    nn.Linear(h1, h2),
    *act,
    nn.Dropout(0.2),
    nn.Linear(h2, h3),
    *act,
    nn.Dropout(0.1),
    nn.Linear(h3, h4),
    *act,
    nn.Linear(h4, 1),
  )


def upstream_state_dict(mlp):
  """Keys as the upstream ``MLP`` saves them: ``layers.<index>.*``."""
  return {f"layers.{k}": v for k, v in mlp.state_dict().items()}


@torch_only
@pytest.mark.parametrize("relu", [False, True], ids=["linearMSE", "reluMSE"])
def test_aesthetic_matches_torch(tmp_path, relu):
  import torch

  tower = hf_clip(act="quick_gelu")  # OpenAI CLIP's activation
  tower.save_pretrained(tmp_path / "clip_l14")
  # Gains large enough that the scores differ by O(1) between images.
  mlp = torch_aesthetic_mlp((16, 24, 8, 6, 4, 1), relu)
  mlp = torch_randomize(mlp, seed=3, scale=1.0)
  head = str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
  torch.save(upstream_state_dict(mlp), head)
  x = make_images()
  pixels = pp.clip_preprocess(jnp.asarray(x), size=16, crop="round")
  with torch.no_grad():
    emb = pooled(tower.get_image_features(pixel_values=nchw(pixels)))
    want = mlp(unit(emb))[:, 0].numpy()
  assert np.ptp(want) > 0.1  # the images matter, not only the biases
  r = rewards.get("aesthetic", path=head, clip_path=str(tmp_path / "clip_l14"))
  assert r.text_length == 0
  got = np.asarray(jax.jit(r.score)(r.params, x, None))
  assert rel_err(got, want) <= 1e-5
  # The .safetensors conversion (CLI) scores the same.
  dst = str(tmp_path / "aesthetic.safetensors")
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  cmd = [sys.executable, "-m", "leapalign_jax.convert", "aesthetic"]
  res = subprocess.run(
    [*cmd, "--src", head, "--dst", dst], capture_output=True, text=True, env=env
  )
  assert res.returncode == 0, res.stderr
  r2 = rewards.get("aesthetic", path=dst, clip_path=str(tmp_path / "clip_l14"))
  got2 = np.asarray(jax.jit(r2.score)(r2.params, x, None))
  np.testing.assert_array_equal(got2, got)


@torch_only
def test_aesthetic_head_errors(tmp_path, files):
  import torch

  sd = upstream_state_dict(torch_aesthetic_mlp((16, 24, 8, 6, 4, 1), False))
  sd["layers.5.weight"] = torch.zeros(2, 2)  # not a released layout
  path = str(tmp_path / "odd.pth")
  torch.save(sd, path)
  one_line_error(
    lambda: rewards.get("aesthetic", path=path, clip_path=files["hf"]),
    "Sequential indices",
    ConversionError,
  )
