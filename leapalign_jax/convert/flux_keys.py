"""Flux's key tables: BFL and diffusers tensor names <-> our parameters.

The two tables are the whole mapping (flux.md §9–10); ``convert.flux``
reads and writes the files with them, in both directions. Ours differs
from BFL only by layout: kernels are transposed, fused qkv kernels keep their
``(3, heads, head_dim)`` structure, and the single block's ``linear1`` /
``linear2`` are stored as their qkv / MLP parts (``linear2`` split by input
columns, one bias). diffusers additionally splits q, k and v and swaps the
final layer's (shift, scale) halves.
"""

from __future__ import annotations

from leapalign_jax.convert import keymap
from leapalign_jax.convert.keymap import Rule, Src, linear, reshape, swap_halves
from leapalign_jax.models.flux import FluxConfig


def _common_embedders(t: keymap.Table, c: FluxConfig, names: dict[str, str]):
  D = c.hidden_size
  t.lin(("img_in",), None, names["img_in"], c.in_channels, D)
  t.lin(("txt_in",), None, names["txt_in"], c.context_in_dim, D)
  embedders = [("time_in", 256), ("vector_in", c.vec_in_dim)]
  if c.guidance_embed:
    embedders.append(("guidance_in", 256))
  for ours, in_dim in embedders:
    src_in, src_out = names[ours]
    t.lin((ours, "in_layer"), None, src_in, in_dim, D)
    t.lin((ours, "out_layer"), None, src_out, D, D)


def bfl_rules(c: FluxConfig) -> list[Rule]:
  """Key table for BFL single files (``flux1-dev.safetensors``)."""
  t = keymap.Table()
  D, H, Dh, F = c.hidden_size, c.num_heads, c.head_dim, c.mlp_hidden
  _common_embedders(
    t,
    c,
    {
      "img_in": "img_in",
      "txt_in": "txt_in",
      "time_in": ("time_in.in_layer", "time_in.out_layer"),
      "vector_in": ("vector_in.in_layer", "vector_in.out_layer"),
      "guidance_in": ("guidance_in.in_layer", "guidance_in.out_layer"),
    },
  )
  for i in range(c.depth):
    b = f"double_blocks.{i}"
    for s in ("img", "txt"):
      t.lin(
        ("double_blocks", f"{s}_mod", "lin"), i, f"{b}.{s}_mod.lin", D, 6 * D
      )
      t.lin(
        ("double_blocks", f"{s}_attn", "qkv"),
        i,
        f"{b}.{s}_attn.qkv",
        D,
        (3, H, Dh),
        bias=c.qkv_bias,
      )
      t.lin(
        ("double_blocks", f"{s}_attn", "proj"),
        i,
        f"{b}.{s}_attn.proj",
        (H, Dh),
        D,
      )
      for n in ("query_norm", "key_norm"):
        t.add(
          ("double_blocks", f"{s}_attn", "norm", n, "scale"),
          i,
          [Src(f"{b}.{s}_attn.norm.{n}.scale", (Dh,))],
          keymap.identity(),
        )
      t.lin(
        ("double_blocks", f"{s}_mlp", "layers", 0), i, f"{b}.{s}_mlp.0", D, F
      )
      t.lin(
        ("double_blocks", f"{s}_mlp", "layers", 2), i, f"{b}.{s}_mlp.2", F, D
      )
  for i in range(c.depth_single_blocks):
    b = f"single_blocks.{i}"
    l1 = (3 * D + F, D)
    t.lin(
      ("single_blocks", "linear1", "qkv"),
      i,
      None,
      D,
      (3, H, Dh),
      parts=[(f"{b}.linear1", 0, 3 * D)],
      src_shape=l1,
    )
    t.lin(
      ("single_blocks", "linear1", "mlp"),
      i,
      None,
      D,
      F,
      parts=[(f"{b}.linear1", 3 * D, None)],
      src_shape=l1,
    )
    w2 = f"{b}.linear2.weight"
    t.add(
      ("single_blocks", "linear2", "attn", "kernel"),
      i,
      [Src(w2, (D, D + F), 1, 0, D)],
      linear((H, Dh), D),
    )
    t.add(
      ("single_blocks", "linear2", "mlp", "kernel"),
      i,
      [Src(w2, (D, D + F), 1, D, None)],
      linear(F, D),
    )
    t.add(
      ("single_blocks", "linear2", "bias"),
      i,
      [Src(f"{b}.linear2.bias", (D,))],
      keymap.identity(),
    )
    for n in ("query_norm", "key_norm"):
      t.add(
        ("single_blocks", "norm", n, "scale"),
        i,
        [Src(f"{b}.norm.{n}.scale", (Dh,))],
        keymap.identity(),
      )
    t.lin(
      ("single_blocks", "modulation", "lin"), i, f"{b}.modulation.lin", D, 3 * D
    )
  t.lin(
    ("final_layer", "linear"), None, "final_layer.linear", D, c.out_channels
  )
  t.lin(
    ("final_layer", "adaLN_modulation", "layers", 1),
    None,
    "final_layer.adaLN_modulation.1",
    D,
    2 * D,
  )
  return t.rules


def diffusers_rules(c: FluxConfig) -> list[Rule]:
  """Key table for diffusers ``FluxTransformer2DModel`` folders."""
  t = keymap.Table()
  D, H, Dh, F = c.hidden_size, c.num_heads, c.head_dim, c.mlp_hidden
  te = "time_text_embed"
  _common_embedders(
    t,
    c,
    {
      "img_in": "x_embedder",
      "txt_in": "context_embedder",
      "time_in": (
        f"{te}.timestep_embedder.linear_1",
        f"{te}.timestep_embedder.linear_2",
      ),
      "vector_in": (
        f"{te}.text_embedder.linear_1",
        f"{te}.text_embedder.linear_2",
      ),
      "guidance_in": (
        f"{te}.guidance_embedder.linear_1",
        f"{te}.guidance_embedder.linear_2",
      ),
    },
  )

  def qkv(target, layer, keys, bias):
    srcs_w = [Src(f"{k}.weight", (D, D)) for k in keys]
    t.add((*target, "kernel"), layer, srcs_w, linear(D, (3, H, Dh)))
    if bias:
      srcs_b = [Src(f"{k}.bias", (D,)) for k in keys]
      t.add((*target, "bias"), layer, srcs_b, reshape((3, H, Dh), (3 * D,)))

  def norm(target, layer, key):
    t.add(
      (*target, "scale"),
      layer,
      [Src(f"{key}.weight", (Dh,))],
      keymap.identity(),
    )

  for i in range(c.depth):
    b = f"transformer_blocks.{i}"
    streams = {
      "img": dict(
        mod="norm1",
        q="to_q",
        k="to_k",
        v="to_v",
        out="attn.to_out.0",
        nq="norm_q",
        nk="norm_k",
        ff="ff",
      ),
      "txt": dict(
        mod="norm1_context",
        q="add_q_proj",
        k="add_k_proj",
        v="add_v_proj",
        out="attn.to_add_out",
        nq="norm_added_q",
        nk="norm_added_k",
        ff="ff_context",
      ),
    }
    for s, n in streams.items():
      t.lin(
        ("double_blocks", f"{s}_mod", "lin"),
        i,
        f"{b}.{n['mod']}.linear",
        D,
        6 * D,
      )
      qkv(
        ("double_blocks", f"{s}_attn", "qkv"),
        i,
        [f"{b}.attn.{n[x]}" for x in "qkv"],
        c.qkv_bias,
      )
      t.lin(
        ("double_blocks", f"{s}_attn", "proj"), i, f"{b}.{n['out']}", (H, Dh), D
      )
      norm(
        ("double_blocks", f"{s}_attn", "norm", "query_norm"),
        i,
        f"{b}.attn.{n['nq']}",
      )
      norm(
        ("double_blocks", f"{s}_attn", "norm", "key_norm"),
        i,
        f"{b}.attn.{n['nk']}",
      )
      t.lin(
        ("double_blocks", f"{s}_mlp", "layers", 0),
        i,
        f"{b}.{n['ff']}.net.0.proj",
        D,
        F,
      )
      t.lin(
        ("double_blocks", f"{s}_mlp", "layers", 2),
        i,
        f"{b}.{n['ff']}.net.2",
        F,
        D,
      )
  for i in range(c.depth_single_blocks):
    b = f"single_transformer_blocks.{i}"
    qkv(
      ("single_blocks", "linear1", "qkv"),
      i,
      [f"{b}.attn.to_{x}" for x in "qkv"],
      True,
    )
    t.lin(("single_blocks", "linear1", "mlp"), i, f"{b}.proj_mlp", D, F)
    w2 = f"{b}.proj_out.weight"
    t.add(
      ("single_blocks", "linear2", "attn", "kernel"),
      i,
      [Src(w2, (D, D + F), 1, 0, D)],
      linear((H, Dh), D),
    )
    t.add(
      ("single_blocks", "linear2", "mlp", "kernel"),
      i,
      [Src(w2, (D, D + F), 1, D, None)],
      linear(F, D),
    )
    t.add(
      ("single_blocks", "linear2", "bias"),
      i,
      [Src(f"{b}.proj_out.bias", (D,))],
      keymap.identity(),
    )
    norm(("single_blocks", "norm", "query_norm"), i, f"{b}.attn.norm_q")
    norm(("single_blocks", "norm", "key_norm"), i, f"{b}.attn.norm_k")
    t.lin(
      ("single_blocks", "modulation", "lin"), i, f"{b}.norm.linear", D, 3 * D
    )
  t.lin(("final_layer", "linear"), None, "proj_out", D, c.out_channels)
  # diffusers chunks norm_out as (scale, shift); BFL as (shift, scale).
  t.add(
    ("final_layer", "adaLN_modulation", "layers", 1, "kernel"),
    None,
    [Src("norm_out.linear.weight", (2 * D, D))],
    swap_halves(linear(D, 2 * D)),
  )
  t.add(
    ("final_layer", "adaLN_modulation", "layers", 1, "bias"),
    None,
    [Src("norm_out.linear.bias", (2 * D,))],
    swap_halves(keymap.identity()),
  )
  return t.rules


RULES = {"bfl": bfl_rules, "diffusers": diffusers_rules}
