"""Flux conversion: byte-exact round trips, the CLI, and every error case."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from leapalign_jax.convert import ConversionError, export_flux, load_flux
from leapalign_jax.convert import flux as cflux
from leapalign_jax.convert.safetensors_io import TensorSource, save_file
from leapalign_jax.models.flux import Flux, FluxConfig

TINY = FluxConfig(
  in_channels=8,
  vec_in_dim=10,
  context_in_dim=12,
  hidden_size=32,
  num_heads=2,
  depth=2,
  depth_single_blocks=2,
  axes_dim=(4, 4, 8),
  out_channels=8,
  zero_init=False,
)


def random_model(config=TINY, seed=0):
  model = Flux(config, rngs=nnx.Rngs(seed))
  # Non-trivial biases and norm scales, so swaps and slices are visible.
  state = nnx.state(model, nnx.Param)
  key = jax.random.key(seed + 1)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(key, len(leaves))
  leaves = [
    x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)
  ]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def tensors(path):
  src = TensorSource.from_files([path])
  return {k: np.array(src[k]) for k in src}


def assert_bytes_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    assert a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture(scope="module")
def bfl_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bfl") / "flux1-tiny.safetensors")
  export_flux(random_model(), path, layout="bfl")
  return path


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory, bfl_file):
  path = str(tmp_path_factory.mktemp("dif") / "transformer")
  _, model = load_flux(bfl_file, config=TINY)
  export_flux(model, path, layout="diffusers")
  return path


def test_key_tables_cover_the_released_checkpoints():
  """flux.md §9: 780/776 BFL tensors and 1160/1156 diffusers tensors."""
  from leapalign_jax.convert.keymap import expected_sources
  from leapalign_jax.models.flux import VARIANTS

  counts = {
    (name, layout): len(expected_sources(cflux.RULES[layout](VARIANTS[name])))
    for name in ("dev", "schnell")
    for layout in ("bfl", "diffusers")
  }
  assert counts == {
    ("dev", "bfl"): 780,
    ("schnell", "bfl"): 776,
    ("dev", "diffusers"): 1160,
    ("schnell", "diffusers"): 1156,
  }


def test_bfl_round_trip_is_byte_exact(bfl_file, tmp_path):
  src = tensors(bfl_file)
  assert len(src) == 16 + 24 * TINY.depth + 8 * TINY.depth_single_blocks + 4
  _, model = load_flux(bfl_file, config=TINY)
  out = str(tmp_path / "again.safetensors")
  export_flux(model, out, layout="bfl")
  assert_bytes_equal(tensors(out), src)


def test_bf16_round_trip_is_byte_exact(bfl_file, tmp_path):
  src = tensors(bfl_file)
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in src.items()}
  path = str(tmp_path / "bf16.safetensors")
  save_file(bf16, path)
  for param_dtype in ("bfloat16", "float32"):
    _, model = load_flux(path, config=TINY, param_dtype=param_dtype)
    out = str(tmp_path / f"out-{param_dtype}.safetensors")
    export_flux(model, out, layout="bfl", dtype="bfloat16")
    assert_bytes_equal(tensors(out), bf16)


def test_diffusers_round_trip_and_outputs(diffusers_dir, bfl_file, tmp_path):
  cfg, model = load_flux(diffusers_dir)
  assert cflux.variant_name(cfg) is None
  assert cfg.axes_dim == TINY.axes_dim  # from config.json
  out = str(tmp_path / "transformer")
  export_flux(model, out, layout="diffusers")
  assert_bytes_equal(
    tensors(os.path.join(out, "diffusion_pytorch_model.safetensors")),
    tensors(os.path.join(diffusers_dir, "diffusion_pytorch_model.safetensors")),
  )
  # Same weights from both layouts give identical parameters.
  _, from_bfl = load_flux(bfl_file, config=TINY)
  a = jax.tree.leaves(nnx.state(model, nnx.Param))
  b = jax.tree.leaves(nnx.state(from_bfl, nnx.Param))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_streaming_cli_both_directions(bfl_file, diffusers_dir, tmp_path):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  run = lambda *a: subprocess.run(  # noqa: E731
    [sys.executable, "-m", "leapalign_jax.convert", "flux", *a],
    capture_output=True,
    text=True,
    env=env,
  )
  r = run("--src", diffusers_dir, "--dst", str(tmp_path / "bfl"))
  assert r.returncode == 0, r.stderr
  written = r.stdout.split()[-1]
  assert_bytes_equal(tensors(written), tensors(bfl_file))
  to_diffusers = ("--src", bfl_file, "--dst", str(tmp_path / "d"))
  to_diffusers += ("--layout", "diffusers")
  r = run(*to_diffusers)
  assert r.returncode == 2 and "--axes-dim" in r.stderr  # head dim 16
  r = run(*to_diffusers, "--axes-dim", "4,4,8")
  assert r.returncode == 0, r.stderr
  cfg, _ = load_flux(str(tmp_path / "d"))
  assert cfg.depth == TINY.depth and cfg.axes_dim == TINY.axes_dim
  r = run("--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "x"))
  assert r.returncode == 2
  assert r.stderr.startswith("error: ") and "no such file" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


def test_sharded_export_has_index(tmp_path, bfl_file):
  from leapalign_jax.convert import safetensors_io

  _, model = load_flux(bfl_file, config=TINY)
  flat = cflux.RULES["diffusers"](TINY)
  from leapalign_jax.convert.loading import export_tensors

  files = safetensors_io.save_sharded(
    export_tensors(flat, model), str(tmp_path / "t"), max_shard_bytes=40_000
  )
  assert len(files) > 1
  with open(
    tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json"
  ) as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(files)
  with open(tmp_path / "t" / "config.json", "w") as f:
    json.dump(cflux.diffusers_config_dict(TINY), f)
  cfg, _ = load_flux(str(tmp_path / "t"))
  assert cfg.depth_single_blocks == 2


# ---------------------------------------------------------------- errors ---


def rewrite(src_path, dst_path, fn):
  t = tensors(src_path)
  fn(t)
  save_file(t, dst_path)
  return dst_path


def error_of(fn):
  with pytest.raises(ConversionError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg
  return msg


def test_missing_key_is_named(bfl_file, tmp_path):
  p = rewrite(
    bfl_file,
    str(tmp_path / "m.safetensors"),
    lambda t: t.pop("double_blocks.1.txt_attn.proj.weight"),
  )
  msg = error_of(lambda: load_flux(p, config=TINY))
  assert "missing" in msg and "double_blocks.1.txt_attn.proj.weight" in msg


def test_unexpected_key_is_named(bfl_file, tmp_path):
  p = rewrite(
    bfl_file,
    str(tmp_path / "u.safetensors"),
    lambda t: t.__setitem__("lora_unet.extra", np.zeros(3, np.float32)),
  )
  msg = error_of(lambda: load_flux(p, config=TINY))
  assert "unexpected" in msg and "lora_unet.extra" in msg


def test_shape_mismatch_is_named(bfl_file, tmp_path):
  def bad(t):
    t["single_blocks.0.linear2.weight"] = t["single_blocks.0.linear2.weight"][
      :, :-1
    ]

  p = rewrite(bfl_file, str(tmp_path / "s.safetensors"), bad)
  msg = error_of(lambda: load_flux(p, config=TINY))
  assert "wrong shape" in msg and "single_blocks.0.linear2.weight" in msg


def test_truncated_and_corrupt_files(bfl_file, tmp_path):
  with open(bfl_file, "rb") as f:
    data = f.read()
  trunc = tmp_path / "t.safetensors"
  trunc.write_bytes(data[: len(data) - 100])
  msg = error_of(lambda: load_flux(str(trunc)))
  assert "truncated" in msg and str(trunc) in msg
  corrupt = tmp_path / "c.safetensors"
  corrupt.write_bytes(data[:8] + b"{not json" + data[17:])
  msg = error_of(lambda: load_flux(str(corrupt)))
  assert "corrupt" in msg and str(corrupt) in msg
  tiny = tmp_path / "z.safetensors"
  tiny.write_bytes(b"abc")
  assert "too short" in error_of(lambda: load_flux(str(tiny)))


def test_not_flux_and_missing_paths(tmp_path):
  p = str(tmp_path / "other.safetensors")
  save_file({"encoder.conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)}, p)
  assert "no Flux transformer weights" in error_of(lambda: load_flux(p))
  assert "no such file" in error_of(lambda: load_flux(str(tmp_path / "nope")))
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "not a diffusers" in error_of(lambda: load_flux(str(empty)))


def test_diffusers_folder_missing_index(diffusers_dir, tmp_path):
  folder = tmp_path / "t"
  folder.mkdir()
  t = tensors(
    os.path.join(diffusers_dir, "diffusion_pytorch_model.safetensors")
  )
  keys = sorted(t)
  save_file(
    {k: t[k] for k in keys[:10]},
    str(folder / "diffusion_pytorch_model-00001-of-00002.safetensors"),
  )
  save_file(
    {k: t[k] for k in keys[10:]},
    str(folder / "diffusion_pytorch_model-00002-of-00002.safetensors"),
  )
  msg = error_of(lambda: load_flux(str(folder)))
  assert "no index" in msg and "index.json" in msg


def test_index_naming_a_missing_shard(tmp_path):
  folder = tmp_path / "t"
  folder.mkdir()
  (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {"x_embedder.weight": "shard-2.safetensors"}})
  )
  msg = error_of(lambda: load_flux(str(folder)))
  assert "missing" in msg and "shard-2.safetensors" in msg


def test_wrong_variant_for_config(bfl_file, tmp_path):
  msg = error_of(lambda: load_flux(bfl_file, config="dev"))
  assert "do not fit" in msg and "hidden_size" in msg
  schnell_like = FluxConfig(**{**TINY.__dict__, "guidance_embed": False})
  msg = error_of(lambda: load_flux(bfl_file, config=schnell_like))
  assert "guidance_embed=True" in msg
  assert "unknown Flux variant" in error_of(
    lambda: load_flux(bfl_file, config="pro")
  )


def test_quantised_dtype_rejected(tmp_path):
  import struct

  header = json.dumps(
    {"img_in.weight": {"dtype": "I4", "shape": [2], "data_offsets": [0, 1]}}
  ).encode()
  p = tmp_path / "q.safetensors"
  p.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00")
  msg = error_of(lambda: load_flux(str(p)))
  assert "I4" in msg and "not supported" in msg


def test_guidance_required_for_distilled_model():
  model = Flux(FluxConfig(**{**TINY.__dict__}), rngs=nnx.Rngs(0))
  x = np.zeros((1, 4, 8), np.float32)
  with pytest.raises(ValueError, match="guidance-distilled"):
    model(
      x,
      np.zeros((1, 4, 3)),
      np.zeros((1, 2, 12)),
      np.zeros((1, 2, 3)),
      np.ones(1),
      np.zeros((1, 10)),
      None,
    )
