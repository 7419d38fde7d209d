"""CLIP architectures the weights do not record: head counts and activation.

OpenCLIP state dicts carry no head count. Released sizes are recognised;
any other size is refused unless the caller names its architecture.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from clip_common import error_of, random_model
from flax import nnx

from leapalign_jax import rewards
from leapalign_jax.convert import clip as cclip
from leapalign_jax.convert import export_clip, load_clip
from leapalign_jax.convert.keymap import expected_sources
from leapalign_jax.models import clip
from leapalign_jax.models.clip_openclip import openclip_config

# A tiny OpenCLIP model config: heads 16 wide, as no released model has.
SMALL = dict(
  embed_dim=16,
  vision_cfg=dict(
    width=32, layers=2, head_width=16, patch_size=4, image_size=16
  ),
  text_cfg=dict(context_length=16, vocab_size=128, width=32, heads=2, layers=2),
)


class Shapes(dict):
  """A stand-in source: ``{key: shape}`` with the shape lookups only."""

  description = "shapes"

  def shape(self, key):
    return self[key]


def shapes_only(config, layout):
  """The tensor shapes of ``config`` in ``layout``, without data."""
  return Shapes(expected_sources(cclip.RULES[layout](config)))


@pytest.mark.parametrize(
  "name,text_heads", [("vit-g-14", 16), ("vit-bigg-14", 20)]
)
def test_released_sizes_give_their_head_counts(name, text_heads):
  want = clip.VARIANTS[name]
  got = cclip.infer_config(shapes_only(want, "openclip"), "openclip")
  assert got.vision.num_attention_heads == 16  # not width // 64 (22, 26)
  assert got.text.num_attention_heads == text_heads
  assert got == want  # sizes, heads and OpenCLIP's exact GELU


def _open_clip_configs():
  spec = importlib.util.find_spec("open_clip")  # not imported: no torchvision
  if spec is None:
    pytest.skip("open_clip is not installed")
  return os.path.join(spec.submodule_search_locations[0], "model_configs")


def test_openclip_names_are_open_clips_configs():
  folder = _open_clip_configs()
  names = [n for n in clip.VARIANTS if n.startswith("ViT-")]
  assert len(names) == 7
  for name in names:
    with open(os.path.join(folder, name + ".json")) as f:
      assert openclip_config(json.load(f)) == clip.VARIANTS[name], name
  assert clip.VARIANTS["ViT-L-14-quickgelu"] == clip.VARIANTS["vit-l-14"]
  assert clip.VARIANTS["ViT-L-14"].vision.hidden_act == "gelu"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """The SMALL model as an OpenCLIP file and a transformers folder."""
  model = random_model(openclip_config(SMALL))
  tmp = tmp_path_factory.mktemp("arch")
  oc, hf = str(tmp / "oc.safetensors"), str(tmp / "hf")
  export_clip(model, oc, layout="openclip")
  export_clip(model, hf)
  return model, oc, hf


def test_an_unknown_openclip_size_is_refused(small):
  _, oc, hf = small
  msg = error_of(lambda: load_clip(oc))
  assert "head count" in msg and "variant=" in msg and "ViT-bigG-14" in msg
  with pytest.raises(ValueError, match="head count") as e:
    rewards.get("hpsv2", path=oc)
  assert "\n" not in str(e.value) and "rewards.hpsv2.path" in str(e.value)
  config, _ = load_clip(hf)  # config.json records the head counts
  assert config.vision.num_attention_heads == 2


def params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize(
  "variant", [SMALL, openclip_config(SMALL)], ids=["dict", "config"]
)
def test_the_size_loads_when_its_architecture_is_given(small, variant):
  model, oc, _ = small
  config, loaded = load_clip(oc, variant=variant)
  assert config.vision.num_attention_heads == 2
  assert all(
    np.array_equal(a, b) for a, b in zip(params(loaded), params(model))
  )
  _, text = load_clip(oc, variant=variant, towers=("text",))
  assert text.vision_model is None


def test_a_rewards_variant_applies_to_real_loads(small):
  _, oc, hf = small
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3))
  ids = np.tile(np.arange(16, dtype=np.int32), (2, 1))
  scores = []
  for path, variant in ((oc, SMALL), (hf, "")):
    r = rewards.get("hpsv2", path=path, variant=variant)
    scores.append(np.asarray(r.score(r.params, x, {"hpsv2": ids})))
  np.testing.assert_allclose(scores[0], scores[1], rtol=1e-6)
  with pytest.raises(ValueError, match="do not fit") as e:
    rewards.get("hpsv2", path=oc, variant="ViT-H-14")
  assert str(e.value).startswith("rewards.hpsv2.path: ")


def test_abstract_builds_take_openclip_names():
  r = rewards.build({"hpsv2": {"variant": "ViT-bigG-14"}}, abstract=True)
  shapes = {x.shape for x in jax.tree.leaves(r.params["hpsv2"])}
  assert (48, 1664, 3, 16, 104) in shapes  # vision qkv: 16 heads of 104
  assert (32, 1280, 3, 20, 64) in shapes  # text qkv: 20 heads of 64


def test_convert_command_takes_the_variant(tmp_path):
  tiny = clip.VARIANTS["tiny"]
  oc = str(tmp_path / "oc.safetensors")
  export_clip(random_model(tiny), oc, layout="openclip")
  argv = [sys.executable, "-m", "leapalign_jax.convert", "clip", "--src", oc]
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  run = lambda *a: subprocess.run(  # noqa: E731
    [*argv, *a], capture_output=True, text=True, env=env
  )
  r = run("--dst", str(tmp_path / "no"))
  assert r.returncode == 2 and "--variant" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  r = run("--dst", str(tmp_path / "hf"), "--variant", "tiny")
  assert r.returncode == 0, r.stderr
  config, _ = load_clip(str(tmp_path / "hf"))
  assert config.text == tiny.text and config.vision == tiny.vision
