"""SD3 / SD3.5 key tables: Stability's and diffusers' names <-> ours.

Ours mirrors Stability's ``mmditx.py`` (``models/sd3.py``); ``convert/sd3.py``
explains the layout differences and applies these tables in both
directions (loading, export, PEFT LoRA export).
"""

from __future__ import annotations

from leapalign_jax.convert import keymap
from leapalign_jax.convert.keymap import Src, Transform, linear, reshape
from leapalign_jax.models.sd3 import SD3Config


def _patch_conv(c: SD3Config) -> Transform:
  """Conv ``[D, C, 2, 2]`` <-> our packed-token kernel ``[4C, D]``."""
  D, C = c.hidden_size, c.in_channels
  return keymap.chain(reshape((D, 4 * C), (D, C, 2, 2)), linear(4 * C, D))


def _unpatch(c: SD3Config, with_linear: bool) -> Transform:
  """Final outputs ``(ph, pw, c)`` <-> packed ``(c, ph, pw)`` (rows of W)."""
  C, D = c.out_channels, c.hidden_size
  tail = (D,) if with_linear else ()

  def fwd(a):
    a = a.reshape(2, 2, C, *tail).transpose(2, 0, 1, *range(3, 3 + len(tail)))
    return a.reshape(4 * C, *tail)

  def inv(a):
    a = a.reshape(C, 2, 2, *tail).transpose(1, 2, 0, *range(3, 3 + len(tail)))
    return a.reshape(4 * C, *tail)

  perm = Transform(fwd, inv, "unpatch")
  return keymap.chain(perm, linear(D, 4 * C)) if with_linear else perm


def _block_target(c: SD3Config, i: int) -> tuple[tuple[str, ...], int | None]:
  """Our group and layer of the reference's block ``i``."""
  if i < c.num_dual:
    return ("dual_blocks",), i
  if i < c.depth - 1:
    return ("joint_blocks",), i - c.num_dual
  return ("last_block",), None


def _stream_rules(t, c, i, stream, names, *, pre_only, dual, swap_mod):
  """One stream (``context_block`` / ``x_block``) of block ``i``."""
  D, H, Dh = c.hidden_size, c.num_heads, c.head_dim
  group, layer = _block_target(c, i)
  base = (*group, stream)
  n_mods = 9 if dual else (2 if pre_only else 6)
  mod = (*base, "adaLN_modulation", "layers", 1)
  if swap_mod:  # diffusers' AdaLayerNormContinuous: (scale, shift)
    w = Src(f"{names['mod']}.weight", (n_mods * D, D))
    b = Src(f"{names['mod']}.bias", (n_mods * D,))
    t.add((*mod, "kernel"), layer, [w], keymap.swap_halves(linear(D, 2 * D)))
    t.add((*mod, "bias"), layer, [b], keymap.swap_halves(keymap.identity()))
  else:
    t.lin(mod, layer, names["mod"], D, n_mods * D)
  attns = [("attn", names["attn"], pre_only)]
  if dual:
    attns.append(("attn2", names["attn2"], False))
  for ours, src, attn_pre_only in attns:
    qkv = src["qkv"]
    if isinstance(qkv, str):  # Stability: one fused [3D, D] linear
      t.lin((*base, ours, "qkv"), layer, qkv, D, (3, H, Dh))
    else:  # diffusers: to_q / to_k / to_v, concatenated along rows
      w = [Src(f"{k}.weight", (D, D)) for k in qkv]
      b = [Src(f"{k}.bias", (D,)) for k in qkv]
      t.add((*base, ours, "qkv", "kernel"), layer, w, linear(D, (3, H, Dh)))
      t.add(
        (*base, ours, "qkv", "bias"), layer, b, reshape((3, H, Dh), (3 * D,))
      )
    if c.qk_norm:
      for n in ("ln_q", "ln_k"):
        t.add(
          (*base, ours, n, "scale"),
          layer,
          [Src(f"{src[n]}.weight", (Dh,))],
          keymap.identity(),
        )
    if not attn_pre_only:
      t.lin((*base, ours, "proj"), layer, src["proj"], (H, Dh), D)
  if not pre_only:
    F = int(D * c.mlp_ratio)
    t.lin((*base, "mlp", "fc1"), layer, names["fc1"], D, F)
    t.lin((*base, "mlp", "fc2"), layer, names["fc2"], F, D)


def stability_rules(c: SD3Config) -> list[keymap.Rule]:
  """Key table for Stability's ``MMDiTX`` state dict (prefix stripped)."""
  t = keymap.Table()
  D = c.hidden_size
  t.add(
    ("x_embedder", "proj", "kernel"),
    None,
    [Src("x_embedder.proj.weight", (D, c.in_channels, 2, 2))],
    _patch_conv(c),
  )
  t.add(
    ("x_embedder", "proj", "bias"),
    None,
    [Src("x_embedder.proj.bias", (D,))],
    keymap.identity(),
  )
  for ours, in_dim in (("t_embedder", 256), ("y_embedder", c.pooled_dim)):
    t.lin((ours, "mlp", "layers", 0), None, f"{ours}.mlp.0", in_dim, D)
    t.lin((ours, "mlp", "layers", 2), None, f"{ours}.mlp.2", D, D)
  t.lin(("context_embedder",), None, "context_embedder", c.context_in_dim, D)
  for i in range(c.depth):
    for stream in ("context_block", "x_block"):
      p = f"joint_blocks.{i}.{stream}"
      last_ctx = stream == "context_block" and i == c.depth - 1

      def attn(name, p=p):
        return {
          "qkv": f"{p}.{name}.qkv",
          "ln_q": f"{p}.{name}.ln_q",
          "ln_k": f"{p}.{name}.ln_k",
          "proj": f"{p}.{name}.proj",
        }

      names = {
        "mod": f"{p}.adaLN_modulation.1",
        "attn": attn("attn"),
        "attn2": attn("attn2"),
        "fc1": f"{p}.mlp.fc1",
        "fc2": f"{p}.mlp.fc2",
      }
      _stream_rules(
        t,
        c,
        i,
        stream,
        names,
        pre_only=last_ctx,
        dual=stream == "x_block" and i < c.num_dual,
        swap_mod=False,
      )
  _final_rules(t, c, "final_layer.linear", "final_layer.adaLN_modulation.1")
  return t.rules


def diffusers_rules(c: SD3Config) -> list[keymap.Rule]:
  """Key table for diffusers' ``SD3Transformer2DModel`` folders."""
  t = keymap.Table()
  D = c.hidden_size
  t.add(
    ("x_embedder", "proj", "kernel"),
    None,
    [Src("pos_embed.proj.weight", (D, c.in_channels, 2, 2))],
    _patch_conv(c),
  )
  t.add(
    ("x_embedder", "proj", "bias"),
    None,
    [Src("pos_embed.proj.bias", (D,))],
    keymap.identity(),
  )
  te = "time_text_embed"
  for ours, src, in_dim in (
    ("t_embedder", f"{te}.timestep_embedder", 256),
    ("y_embedder", f"{te}.text_embedder", c.pooled_dim),
  ):
    t.lin((ours, "mlp", "layers", 0), None, f"{src}.linear_1", in_dim, D)
    t.lin((ours, "mlp", "layers", 2), None, f"{src}.linear_2", D, D)
  t.lin(("context_embedder",), None, "context_embedder", c.context_in_dim, D)
  for i in range(c.depth):
    b = f"transformer_blocks.{i}"
    last = i == c.depth - 1
    x_names = {
      "mod": f"{b}.norm1.linear",
      "attn": {
        "qkv": [f"{b}.attn.to_{x}" for x in "qkv"],
        "ln_q": f"{b}.attn.norm_q",
        "ln_k": f"{b}.attn.norm_k",
        "proj": f"{b}.attn.to_out.0",
      },
      "attn2": {
        "qkv": [f"{b}.attn2.to_{x}" for x in "qkv"],
        "ln_q": f"{b}.attn2.norm_q",
        "ln_k": f"{b}.attn2.norm_k",
        "proj": f"{b}.attn2.to_out.0",
      },
      "fc1": f"{b}.ff.net.0.proj",
      "fc2": f"{b}.ff.net.2",
    }
    ctx_names = {
      "mod": f"{b}.norm1_context.linear",
      "attn": {
        "qkv": [f"{b}.attn.add_{x}_proj" for x in "qkv"],
        "ln_q": f"{b}.attn.norm_added_q",
        "ln_k": f"{b}.attn.norm_added_k",
        "proj": f"{b}.attn.to_add_out",
      },
      "fc1": f"{b}.ff_context.net.0.proj",
      "fc2": f"{b}.ff_context.net.2",
    }
    _stream_rules(
      t,
      c,
      i,
      "context_block",
      ctx_names,
      pre_only=last,
      dual=False,
      swap_mod=last,
    )
    _stream_rules(
      t,
      c,
      i,
      "x_block",
      x_names,
      pre_only=False,
      dual=i < c.num_dual,
      swap_mod=False,
    )
  _final_rules(t, c, "proj_out", "norm_out.linear", swap_mod=True)
  return t.rules


def _final_rules(t, c: SD3Config, linear_key, mod_key, swap_mod=False):
  D, O = c.hidden_size, c.out_features
  t.add(
    ("final_layer", "linear", "kernel"),
    None,
    [Src(f"{linear_key}.weight", (O, D))],
    _unpatch(c, with_linear=True),
  )
  t.add(
    ("final_layer", "linear", "bias"),
    None,
    [Src(f"{linear_key}.bias", (O,))],
    _unpatch(c, with_linear=False),
  )
  mod = ("final_layer", "adaLN_modulation", "layers", 1)
  w, b = Src(f"{mod_key}.weight", (2 * D, D)), Src(f"{mod_key}.bias", (2 * D,))
  lin, ident = linear(D, 2 * D), keymap.identity()
  if swap_mod:
    lin, ident = keymap.swap_halves(lin), keymap.swap_halves(ident)
  t.add((*mod, "kernel"), None, [w], lin)
  t.add((*mod, "bias"), None, [b], ident)


RULES = {"stability": stability_rules, "diffusers": diffusers_rules}
