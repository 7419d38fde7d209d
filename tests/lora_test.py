"""LoRA export: diffusers/PEFT LoRA files and fused weights (tiny Flux, fp32).

The adapted model carries two adapter groups with different ranks and scales
on the fused qkv, the attention outputs, the MLPs, the single blocks' linear1
(qkv + mlp) and linear2 (attn + mlp), and the final layer's swapped adaLN, so
every way a kernel maps to torch weights is exercised.
"""

import json
import os
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from leapalign_jax import export as export_lib
from leapalign_jax import families
from leapalign_jax.convert import (
  ConversionError,
  export_flux,
  flux_keys,
  load_flux,
)
from leapalign_jax.convert import lora as lora_convert
from leapalign_jax.convert.safetensors_io import TensorSource
from leapalign_jax.convert.sd3 import export_sd3
from leapalign_jax.families import flux as flux_family
from leapalign_jax.families import sd3 as sd3_family
from leapalign_jax.models import lora as lora_lib
from leapalign_jax.models import sd3
from leapalign_jax.models.flux import Flux, FluxConfig

CFG = FluxConfig(
  in_channels=8,
  out_channels=8,
  vec_in_dim=10,
  context_in_dim=12,
  hidden_size=32,
  num_heads=2,
  depth=2,
  depth_single_blocks=2,
  axes_dim=(4, 4, 8),
  zero_init=False,  # a non-zero final layer: its adapter must show
)
GROUP_A = (lora_lib.FLUX_TARGETS[0], lora_lib.FLUX_TARGETS[2])  # attn, linear1
GROUP_B = (
  lora_lib.FLUX_TARGETS[1],  # double-block MLPs
  lora_lib.FLUX_TARGETS[3],  # single-block linear2 attn + mlp
  r"final_layer/adaLN_modulation/layers/1",  # (shift, scale) swapped
)


def make_lora_model(seed=0):
  model = Flux(CFG, rngs=nnx.Rngs(seed))
  paths = lora_lib.add_lora(model, GROUP_A, 4, 8.0, rngs=nnx.Rngs(1))
  paths += lora_lib.add_lora(model, GROUP_B, 3, 1.5, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(seed)
  for m in lora_convert.adapted_modules(model).values():
    m.lora_b[...] = jnp.asarray(
      0.3 * rng.standard_normal(m.lora_b.shape), jnp.float32
    )
  return model, tuple(paths)


def read(path):
  src = TensorSource.from_files([path])
  return {k: np.array(src[k]) for k in src}


def read_folder(folder):
  return read(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lora")
  model, paths = make_lora_model()
  # The base (the Param state without the adapters), the adapters, our
  # fused export, and the reference fused weights: merge_lora on a copy,
  # then export_flux.
  _, _, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
  export_flux(base, str(tmp / "base"), layout="diffusers", config=CFG)
  export_flux(base, str(tmp / "base.safetensors"), layout="bfl", config=CFG)
  lora_convert.export_flux_lora(model, str(tmp / "lora"))
  lora_convert.export_flux_merged(model, str(tmp / "fused"))
  merged = nnx.clone(model)
  lora_lib.merge_lora(merged)
  export_flux(merged, str(tmp / "merged"), layout="diffusers")
  export_flux(merged, str(tmp / "merged.safetensors"), layout="bfl")
  return types.SimpleNamespace(tmp=tmp, model=model, merged=merged, paths=paths)


def check_identity(base, merged, lora, prefix=""):
  """``base + B @ A == merged`` where adapted; ``base == merged`` elsewhere."""
  modules = {k.rsplit(".lora_", 1)[0] for k in lora}
  assert len(lora) == 2 * len(modules)
  for key in base:
    module = prefix + key.removesuffix(".weight")
    if module in modules and key.endswith(".weight"):
      a = lora[f"{module}.lora_A.weight"]
      b = lora[f"{module}.lora_B.weight"]
      np.testing.assert_allclose(
        base[key] + b @ a, merged[key], rtol=1e-6, atol=1e-6, err_msg=key
      )
      assert not np.allclose(base[key], merged[key]), key
    else:
      np.testing.assert_array_equal(base[key], merged[key], err_msg=key)
  return modules


def test_merged_weight_identity_diffusers(files):
  lora = read(str(files.tmp / "lora" / lora_convert.LORA_WEIGHT_NAME))
  assert all(k.startswith("transformer.") for k in lora)
  modules = check_identity(
    read_folder(files.tmp / "base"),
    read_folder(files.tmp / "merged"),
    lora,
    prefix="transformer.",
  )
  # 2 double blocks x 2 streams x (q, k, v, out, mlp in, mlp out) + 2 single
  # blocks x (q, k, v, proj_mlp, proj_out) + norm_out.
  assert len(modules) == 2 * 2 * 6 + 2 * 5 + 1
  a = lora["transformer.single_transformer_blocks.1.proj_out.lora_A.weight"]
  D = CFG.hidden_size
  # linear2.attn and linear2.mlp (rank 3 each) stack along the rank with a
  # block-diagonal lora_A: attention columns only in the first 3 rows.
  assert a.shape == (6, D + CFG.mlp_hidden)
  assert not a[:3, D:].any() and not a[3:, :D].any()
  q = lora["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
  k = lora["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"]
  np.testing.assert_array_equal(q, k)  # split qkv shares lora_A
  assert q.shape == (4, D)


def test_merged_weight_identity_bfl_rows(files):
  """BFL linear1 combines our qkv and mlp adapters by output rows."""
  rules = flux_keys.bfl_rules(CFG)
  lora = {
    k: v.fn() for k, v in lora_convert.lora_tensors(files.model, rules).items()
  }
  lora = {k.removeprefix("transformer."): v for k, v in lora.items()}
  check_identity(
    read(str(files.tmp / "base.safetensors")),
    read(str(files.tmp / "merged.safetensors")),
    lora,
  )
  b = lora["single_blocks.0.linear1.lora_B.weight"]
  D = CFG.hidden_size
  assert b.shape == (3 * D + CFG.mlp_hidden, 8)
  assert not b[: 3 * D, 4:].any() and not b[3 * D :, :4].any()


def test_fused_export_matches_merge_lora(files):
  fused = read_folder(files.tmp / "fused")
  merged = read_folder(files.tmp / "merged")
  assert fused.keys() == merged.keys()
  for key in merged:
    np.testing.assert_allclose(
      fused[key], merged[key], rtol=1e-6, atol=1e-6, err_msg=key
    )
  # The model keeps its adapters (unlike merge_lora).
  assert lora_convert.adapted_modules(files.model)
  assert os.path.isfile(files.tmp / "fused" / "config.json")


def test_dtype_is_applied(files, tmp_path):
  (path,) = lora_convert.export_flux_lora(
    files.model, str(tmp_path / "x.safetensors"), dtype="bfloat16"
  )
  src = TensorSource.from_files([path])
  assert {str(src.infos[k].dtype) for k in src} == {"bfloat16"}


def test_full_export_of_an_adapted_model_is_refused(files, tmp_path):
  """export_flux would write the base weights alone: it names the two ways."""
  for model in (files.model, nnx.state(files.model, nnx.Param)):
    with pytest.raises(ConversionError) as e:
      export_flux(model, str(tmp_path / "x"), config=CFG)
    msg = str(e.value)
    assert "\n" not in msg and "LoRA adapters" in msg
    assert "export_flux_lora" in msg and "export_flux_merged" in msg
  model = sd3.SD3(sd3.VARIANTS["tiny"], rngs=nnx.Rngs(0))
  lora_lib.add_lora(model, sd3_family.SD3_TARGETS, 2, 2.0, rngs=nnx.Rngs(1))
  with pytest.raises(ConversionError, match="export_sd3_lora") as e:
    export_sd3(model, str(tmp_path / "sd3"))
  assert "export_sd3_merged" in str(e.value) and "\n" not in str(e.value)
  assert not os.listdir(tmp_path)


def test_errors(files, tmp_path):
  plain = Flux(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ConversionError, match="no LoRA adapters"):
    lora_convert.export_flux_lora(plain, str(tmp_path))
  with pytest.raises(ConversionError, match="no LoRA adapters"):
    lora_convert.export_flux_merged(plain, str(tmp_path / "f"))
  with pytest.raises(ConversionError, match="unknown LoRA layout 'bfl'"):
    lora_convert.export_flux_lora(files.model, str(tmp_path), layout="bfl")
  with pytest.raises(ConversionError, match="expected a Flux module"):
    lora_convert.export_flux_lora(nnx.state(files.model), str(tmp_path))
  # A table without the adapted final layer: no torch counterpart.
  rules = [
    r for r in flux_keys.diffusers_rules(CFG) if r.target[0] != "final_layer"
  ]
  with pytest.raises(ConversionError, match="final_layer/adaLN_modulation"):
    lora_convert.lora_tensors(files.model, rules)
  assert not os.listdir(tmp_path)  # nothing half-written


# --------------------------------------------------------------------------
# PyTorch: diffusers + peft load the file and reproduce our forward.


def make_inputs(seed=1, h=3, w=5, s=7):
  rng = np.random.default_rng(seed)
  B, L = 2, h * w
  ids = np.zeros((L, 3), np.float32)
  ids[:, 1] = np.repeat(np.arange(h), w)
  ids[:, 2] = np.tile(np.arange(w), h)
  return dict(
    img=rng.standard_normal((B, L, 8), np.float32),
    txt=rng.standard_normal((B, s, 12), np.float32),
    y=rng.standard_normal((B, 10), np.float32),
    t=np.array([0.9, 0.25], np.float32),
    guidance=np.array([3.5, 2.0], np.float32),
    img_ids=ids,
    txt_ids=np.zeros((s, 3), np.float32),
  )


def jax_forward(model, x):
  B = x["img"].shape[0]
  return np.asarray(
    model(
      img=jnp.asarray(x["img"]),
      img_ids=jnp.broadcast_to(x["img_ids"], (B, *x["img_ids"].shape)),
      txt=jnp.asarray(x["txt"]),
      txt_ids=jnp.broadcast_to(x["txt_ids"], (B, *x["txt_ids"].shape)),
      timesteps=jnp.asarray(x["t"]),
      y=jnp.asarray(x["y"]),
      guidance=jnp.asarray(x["guidance"]),
    )
  )


def torch_forward(model, x):
  import torch

  t = {k: torch.from_numpy(v) for k, v in x.items()}
  with torch.no_grad():
    out = model(
      hidden_states=t["img"],
      encoder_hidden_states=t["txt"],
      pooled_projections=t["y"],
      timestep=t["t"],
      img_ids=t["img_ids"],
      txt_ids=t["txt_ids"],
      guidance=t["guidance"],
      return_dict=False,
    )[0]
  return out.numpy()


def rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def reference(files):
  x = make_inputs()
  return x, jax_forward(files.model, x)


@pytest.fixture
def unhandled_keys(monkeypatch):
  """Records what diffusers reports as unexpected / missing LoRA keys."""
  peft_loader = pytest.importorskip("diffusers.loaders.peft")
  found = []
  original = peft_loader._maybe_warn_for_unhandled_keys

  def record(incompatible, adapter_name):
    if incompatible is not None:
      found.extend(k for k in incompatible.unexpected_keys if ".lora_" in k)
      found.extend(
        k
        for k in incompatible.missing_keys
        if ".lora_" in k and adapter_name in k
      )
    return original(incompatible, adapter_name)

  monkeypatch.setattr(peft_loader, "_maybe_warn_for_unhandled_keys", record)
  return found


def torch_base(files):
  diffusers = pytest.importorskip("diffusers")
  return diffusers.FluxTransformer2DModel.from_pretrained(
    str(files.tmp / "base")
  ).eval()


def lora_modules(model):
  from peft.tuners.lora import LoraLayer

  return {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.torch
def test_diffusers_load_lora_adapter(files, reference, unhandled_keys):
  pytest.importorskip("peft")
  x, ours = reference
  model = torch_base(files)
  base_out = torch_forward(model, x)
  path = str(files.tmp / "lora" / lora_convert.LORA_WEIGHT_NAME)
  model.load_lora_adapter(path, prefix="transformer")
  assert not unhandled_keys
  lora = read(path)
  assert lora_modules(model) == {
    k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in lora
  }
  assert rel_err(torch_forward(model, x), ours) <= 1e-5
  assert rel_err(base_out, ours) > 1e-2  # the adapters matter


@pytest.mark.torch
def test_flux_pipeline_load_lora_weights(files, reference, unhandled_keys):
  pytest.importorskip("peft")
  diffusers = pytest.importorskip("diffusers")
  x, ours = reference
  model = torch_base(files)
  pipe = diffusers.FluxPipeline(
    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
    vae=None,
    text_encoder=None,
    tokenizer=None,
    text_encoder_2=None,
    tokenizer_2=None,
    transformer=model,
  )
  pipe.load_lora_weights(str(files.tmp / "lora"))  # finds the file by name
  assert not unhandled_keys
  assert rel_err(torch_forward(model, x), ours) <= 1e-5


@pytest.mark.torch
def test_fused_export_loads_in_diffusers(files, reference):
  diffusers = pytest.importorskip("diffusers")
  x, ours = reference
  model = diffusers.FluxTransformer2DModel.from_pretrained(
    str(files.tmp / "fused")
  ).eval()
  assert rel_err(torch_forward(model, x), ours) <= 1e-5


# --------------------------------------------------------------------------
# export_run: what a training run writes.


def fake_comps(model, lora_paths, layout="diffusers", lora_merged=False):
  if lora_paths:
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, nnx.Param)
  else:
    graphdef, params = nnx.split(model, nnx.Param)
    frozen = None
  config = ml_collections.ConfigDict(
    {
      "flux": {"path": "/ckpt/flux1-dev"},
      "lora": {"rank": 4, "alpha": 8.0, "targets": GROUP_A + GROUP_B},
      "export": {
        "enabled": True,
        "layout": layout,
        "dtype": "bfloat16",
        "lora_merged": lora_merged,
      },
    }
  )

  def model(p):
    return nnx.merge(graphdef, *((p,) if frozen is None else (p, frozen)))

  comps = types.SimpleNamespace(
    config=config,
    family=families.get("flux"),
    graphdef=graphdef,
    frozen={"model": frozen},
    lora_paths=tuple(lora_paths),
    model=model,
  )
  return comps, params


def test_export_run_lora(files, tmp_path):
  comps, params = fake_comps(files.model, files.paths, lora_merged=True)
  written = export_lib.export_run(comps, params, str(tmp_path))
  lora_file = tmp_path / lora_convert.LORA_WEIGHT_NAME
  assert set(written) == {
    str(lora_file),
    str(tmp_path / "lora_info.json"),
    str(tmp_path / "README.md"),
    str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"),
    str(tmp_path / "transformer" / "config.json"),
  }
  want = read(str(files.tmp / "lora" / lora_convert.LORA_WEIGHT_NAME))
  got = read(str(lora_file))
  assert got.keys() == want.keys()
  for k in want:  # the adapters' own fp32, whatever export.dtype (bf16)
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], want[k])
  info = json.loads((tmp_path / "lora_info.json").read_text())
  assert info["base_model"] == "/ckpt/flux1-dev" and info["rank"] == 4
  assert info["adapted_modules"] == list(files.paths)
  # 2 single blocks' proj_out: rank 3 + 3; norm_out and double MLPs: 3.
  assert info["torch_modules_by_rank"] == {"3": 9, "4": 24, "6": 2}


def test_export_run_lora_only(files, tmp_path):
  comps, params = fake_comps(files.model, files.paths)
  written = export_lib.export_run(comps, params, str(tmp_path))
  assert len(written) == 3 and not (tmp_path / "transformer").exists()


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_export_run_full_finetune(files, tmp_path, layout):
  comps, params = fake_comps(files.merged, (), layout=layout)
  written = export_lib.export_run(comps, params, str(tmp_path))
  if layout == "bfl":
    assert written == [str(tmp_path / flux_family.BFL_FILE)]
    target = written[0]
  else:
    assert str(tmp_path / "transformer" / "config.json") in written
    target = str(tmp_path / "transformer")
  _, back = load_flux(target, config=CFG, dtype="float32")
  ours = nnx.to_pure_dict(nnx.state(files.merged, nnx.Param))
  theirs = nnx.to_pure_dict(nnx.state(back, nnx.Param))
  np.testing.assert_allclose(
    theirs["double_blocks"]["img_attn"]["qkv"]["kernel"],
    ours["double_blocks"]["img_attn"]["qkv"]["kernel"],
    rtol=1e-2,
    atol=1e-2,
  )


def test_gather_to_host_casts_only_what_it_gathers():
  import jax

  mesh = jax.make_mesh((8,), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  arr = jax.device_put(jnp.arange(16, dtype=jnp.float32), sharding)
  out = export_lib.gather_to_host({"a": arr}, dtype="bfloat16")
  # One process: every array is addressable and stays as it is.
  assert out["a"] is arr
