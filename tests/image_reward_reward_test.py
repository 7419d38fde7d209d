"""The ``image_reward`` reward: parity, gradient, weighted sum, its ids.

The reference is ``image_reward_test``'s tiny transformers BLIP (vision
tower, cross-attention text tower, five-linear head), saved under
transformers' names next to a tiny BERT ``vocab.txt`` and loaded through
``rewards.build``. Its input is the reference's transform written in torch
float ops (ReFL's training path: clamp to [0, 1], antialiased bicubic
resize of the shorter side, torchvision's centre crop, CLIP mean/std) and
its attention mask is the tokenizer's own.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import image_reward_test as irt  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import rewards_test as rt  # noqa: E402
import tiny_tokenizer  # noqa: E402
from flax import nnx  # noqa: E402

from leapalign_jax import rewards, tokenizers  # noqa: E402
from leapalign_jax.convert import export_clip  # noqa: E402
from leapalign_jax.convert.safetensors_io import save_file  # noqa: E402
from leapalign_jax.errors import UserError  # noqa: E402
from leapalign_jax.models import clip  # noqa: E402
from leapalign_jax.rewards import preprocess as pp  # noqa: E402
from leapalign_jax.rewards import text  # noqa: E402

pytestmark = pytest.mark.torch
PROMPTS = [
  "a photo of a red cat",
  "A small dog sitting in front of the big house",
  " ".join(["green tree"] * 20),  # 40 words: cut to 35 ids
]
SIZE = irt.TINY.vision.image_size  # 32
# ReFL's float transform: torch's antialiased bicubic, no 8-bit saturation.
FLOAT_PATH = {"resample": "torch_bicubic_aa", "saturate": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """ImageReward (transformers names) + vocab.txt, as a user's folder."""
  root = tmp_path_factory.mktemp("image_reward")
  parts = irt.torch_parts()
  # Unit-gain head: with the shared fixture's 0.1-std weights the five
  # linears shrink every score to about the same value (spread ~1e-5, the
  # tolerance), so a wrong crop or mask would go unnoticed.
  g = torch.Generator().manual_seed(7)
  with torch.no_grad():
    for layer in parts[2]:
      if isinstance(layer, torch.nn.Linear):
        fan_in = layer.weight.shape[1]
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        layer.weight.mul_(fan_in**-0.5)
  state = {}
  for prefix, module in zip(
    ("vision_model.", "text_encoder.", "mlp.layers."), parts
  ):
    state.update(
      {prefix + k: v.numpy() for k, v in module.state_dict().items()}
    )
  save_file(state, str(root / "ImageReward.safetensors"))
  tiny_tokenizer.write_bert(root)
  return root, parts


def entry(folder, **kw):
  root, _ = folder
  path = str(root / "ImageReward.safetensors")
  return {"path": path, "variant": "tiny", **FLOAT_PATH, **kw}


def prompt_ids(folder):
  spec = text.specs({"image_reward": entry(folder)}, 77)["image_reward"]
  return spec.tokenizer()(PROMPTS)


def images(seed=0, h=40, w=44):
  """Generator images in [-1, 1] (a small overshoot, as decoders give)."""
  rng = np.random.default_rng(seed)
  return rng.uniform(-1.02, 1.02, (len(PROMPTS), h, w, 3)).astype(np.float32)


def reference_pixels(x_BHWC):
  """ReFL's ``_transform`` in torch float ops: NCHW, normalised."""
  x = torch.from_numpy(x_BHWC).permute(0, 3, 1, 2)
  x = (x / 2 + 0.5).clamp(0, 1)
  h, w = x.shape[2:]
  new = (SIZE, int(SIZE * w / h)) if h <= w else (int(SIZE * h / w), SIZE)
  x = torch.nn.functional.interpolate(
    x, size=new, mode="bicubic", align_corners=False, antialias=True
  )
  # torchvision's CenterCrop: offsets rounded half to even.
  top = int(round((new[0] - SIZE) / 2.0))
  left = int(round((new[1] - SIZE) / 2.0))
  x = x[:, :, top : top + SIZE, left : left + SIZE]
  mean = torch.tensor(pp.OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(pp.OPENAI_CLIP_STD).view(1, 3, 1, 1)
  return ((x - mean) / std).numpy()


def test_registered_with_its_tokenizer():
  assert "image_reward" in rewards.names()
  assert rewards.TOKENIZERS["image_reward"] == "bert"


def test_scores_equal_the_reference(folder):
  root, parts = folder
  reward = rewards.build({"image_reward": entry(folder)})
  assert reward.tokenizers == {"image_reward": "bert"}
  assert reward.lengths == {"image_reward": 35}
  x, ids = images(), prompt_ids(folder)
  ours = np.asarray(jax.jit(reward.score)(reward.params, x, ids))
  tok = tokenizers.load_blip_tokenizer(root)
  enc = tok(PROMPTS, padding="max_length", max_length=35, truncation=True)
  np.testing.assert_array_equal(ids, enc["input_ids"])
  mask = np.asarray(enc["attention_mask"])
  want = irt.torch_score(parts, reference_pixels(x), ids.astype(np.int64), mask)
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
  assert np.ptp(want) > 1e-3  # 100x the tolerance: samples differ
  # The check can tell: transformers' crop offsets (floor) move the scores.
  floor = rewards.build({"image_reward": entry(folder, crop="floor")})
  other = np.asarray(jax.jit(floor.score)(floor.params, x, ids))
  assert np.abs(other - want).max() > 1e-4


def test_default_preprocessing_is_the_pil_transform(folder):
  """Defaults: PIL bicubic on uint8 pixels, torchvision's crop."""
  root, _ = folder
  path = str(root / "ImageReward.safetensors")
  reward = rewards.get("image_reward", path=path, variant="tiny")
  x, ids = images(seed=1), prompt_ids(folder)
  model_fn = reward.fns["image_reward"]
  got = model_fn(reward.params["image_reward"], x, ids)
  # The same model on clip_preprocess's PIL-path pixels.
  from leapalign_jax.convert.image_reward import load_image_reward

  _, model = load_image_reward(path, config="tiny")
  pix = pp.clip_preprocess(x, SIZE, "pil_bicubic", "round", saturate=True)
  want = model.score(pix, jnp.asarray(ids), jnp.asarray(ids != 0))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_gradient_wrt_images(folder):
  reward = rewards.build({"image_reward": entry(folder)})
  ids = prompt_ids(folder)
  grad = jax.jit(
    jax.grad(lambda x: jnp.sum(reward.score(reward.params, x, ids)))
  )(jnp.asarray(images(seed=2)))
  g = np.asarray(grad)
  assert g.shape == (3, 40, 44, 3)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  # Every image's score moves with its own pixels.
  assert np.all(np.abs(g).reshape(3, -1).max(axis=1) > 0)


def test_weighted_sum_with_a_clip_reward(folder, tmp_path):
  cfg = clip.CLIPConfig(rt.TEXT, rt.VISION, 32)
  clip_path = str(tmp_path / "clip")
  export_clip(rt.randomize(clip.CLIP(cfg, rngs=nnx.Rngs(0))), clip_path)
  reward = rewards.build(
    {
      "image_reward": entry(folder, weight=0.7),
      "clip": {"weight": -2.0, "path": clip_path},
    }
  )
  assert reward.lengths == {"image_reward": 35, "clip": 16}
  x = images(seed=3)
  ids = {"image_reward": prompt_ids(folder), "clip": rt.make_ids()}
  each = jax.jit(reward.score_each)(reward.params, x, ids)
  total = np.asarray(jax.jit(reward.score)(reward.params, x, ids))
  want = 0.7 * np.asarray(each["image_reward"]) - 2.0 * np.asarray(each["clip"])
  np.testing.assert_allclose(total, want, rtol=1e-6, atol=1e-6)


def test_abstract_build_reads_nothing():
  """``aot`` builds: shapes only, the published sizes by default."""
  reward = rewards.build({"image_reward": {"dtype": "bfloat16"}}, abstract=True)
  leaves = jax.tree.leaves(reward.params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert {x.dtype for x in leaves} == {jnp.dtype("bfloat16")}
  words = reward.params["image_reward"]["blip"]["text_encoder"]["embeddings"]
  assert words["word_embeddings"]["embedding"].shape == (30524, 768)
  assert reward.lengths == {"image_reward": 35}


def test_ids_are_blips_bert_tokens(folder):
  root, _ = folder
  ids = prompt_ids(folder)
  assert ids.shape == (3, 35) and ids.dtype == np.int32
  tok = tokenizers.load_blip_tokenizer(root)
  cls, sep = tok.cls_token_id, tok.sep_token_id
  assert len(tok) == irt.TINY.text.vocab_size  # vocab.txt + [DEC] + [ENC]
  assert ids[0, :8].tolist() == [cls, 5, 6, 7, 5, 11, 9, sep]
  assert (ids[0, 8:] == 0).all()  # [PAD] is 0: the reward's mask
  assert ids[2, 0] == cls and ids[2, -1] == sep and (ids[2] != 0).all()
  assert tok.unk_token_id not in ids[:2]


def test_tokenizer_folder_option_and_errors(folder, tmp_path):
  root, _ = folder
  path = str(root / "ImageReward.safetensors")
  vocab = tiny_tokenizer.write_bert(tmp_path / "bert")
  lone = tmp_path / "lone"
  lone.mkdir()
  (lone / "ImageReward.safetensors").symlink_to(path)
  cfg = {"image_reward": {"path": str(lone / "ImageReward.safetensors")}}
  with pytest.raises(UserError, match="no BERT vocab.txt beside") as e:
    text.specs(cfg, 77)
  assert "\n" not in str(e.value)
  cfg["image_reward"]["tokenizer"] = str(vocab)
  spec = text.specs(cfg, 77)["image_reward"]
  assert (spec.style, spec.folder, spec.length) == ("bert", str(vocab), 35)
  np.testing.assert_array_equal(spec.tokenizer()(PROMPTS), prompt_ids(folder))
  with pytest.raises(UserError, match="rewards.image_reward.path is empty"):
    rewards.get("image_reward")


def test_embed_prompts_stores_its_ids(folder, tmp_path, monkeypatch):
  """The prompt cache holds ``reward_ids/image_reward`` (35 BERT ids)."""
  from embed_prompts_test import clip_text

  from leapalign_jax import data, defaults, prompts
  from leapalign_jax.families import flux_text

  enc = tmp_path / "encoders"
  tokenizers.train_t5_tokenizer(PROMPTS, str(enc / "tokenizer_2"), 64)
  clip_text(49408, enc / "text_encoder")
  from leapalign_jax.convert import export_t5
  from leapalign_jax.models import t5

  t5_cfg = t5.T5EncoderConfig(
    vocab_size=128, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4
  )
  export_t5(t5.T5Encoder(t5_cfg, rngs=nnx.Rngs(1)), str(enc / "text_encoder_2"))
  c = defaults.base()
  c.text.update(
    clip_path=str(enc / "text_encoder"),
    t5_path=str(enc / "text_encoder_2"),
    t5_tokenizer=str(enc / "tokenizer_2"),
    clip_max_length=16,
    t5_max_length=12,
    batch_size=4,
    dtype="float32",
    cache_dtype="float32",
  )
  c.rewards = {"image_reward": entry(folder)}
  encoders = flux_text.TextEncoders.for_config(c)
  out = str(tmp_path / "cache")
  prompts.embed(encoders, [{"prompt": p} for p in PROMPTS], out, progress=False)
  cache = data.PromptCache(out)
  got = np.stack([cache[i]["reward_ids/image_reward"] for i in range(3)])
  np.testing.assert_array_equal(got, prompt_ids(folder))
  rec = cache.manifest["encoders"]["rewards"]["image_reward"]
  assert rec["style"] == "bert" and rec["length"] == 35
