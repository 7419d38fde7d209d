"""CLIP conversion without torch: round trips, layouts, towers, errors.

The parity tests against transformers and OpenCLIP are ``clip_torch_test``;
shared configs and helpers are ``clip_common``.
"""

import os
import subprocess
import sys

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

from leapalign_jax.convert import export_clip, load_clip
from leapalign_jax.convert.safetensors_io import save_file
from leapalign_jax.models import clip


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
