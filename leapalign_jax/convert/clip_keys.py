"""CLIP's key tables: transformers and OpenCLIP tensor names <-> ours.

One table per layout, used in both directions by ``convert.clip`` (which
finds, reads and writes the files): ``hf`` concatenates separate q/k/v rows
into our fused qkv kernel; ``openclip`` maps the fused ``in_proj_weight``
directly, ``c_fc`` / ``c_proj`` to ``fc1`` / ``fc2``, and keeps its
``[width, dim]`` projections (already our kernel layout).
"""

from __future__ import annotations

from leapalign_jax.convert.keymap import Rule, Src, conv2d, identity, linear
from leapalign_jax.convert.keymap import reshape as reshape_t
from leapalign_jax.models.clip import CLIPConfig

# Where each layout keeps every tensor; the tables below differ only here.
NAMES = {
  "hf": dict(
    token="text_model.embeddings.token_embedding.weight",
    text_pos="text_model.embeddings.position_embedding.weight",
    text_blocks="text_model.encoder.layers.",
    final_norm="text_model.final_layer_norm",
    text_proj="text_projection",
    patch="vision_model.embeddings.patch_embedding.weight",
    cls="vision_model.embeddings.class_embedding",
    vision_pos="vision_model.embeddings.position_embedding.weight",
    pre_norm="vision_model.pre_layrnorm",
    vision_blocks="vision_model.encoder.layers.",
    post_norm="vision_model.post_layernorm",
    vision_proj="visual_projection",
    # inside a block: ln1, ln2, out_proj, fc1, fc2
    block=(
      "layer_norm1",
      "layer_norm2",
      "self_attn.out_proj",
      "mlp.fc1",
      "mlp.fc2",
    ),
  ),
  "openclip": dict(
    token="token_embedding.weight",
    text_pos="positional_embedding",
    text_blocks="transformer.resblocks.",
    final_norm="ln_final",
    text_proj="text_projection",
    patch="visual.conv1.weight",
    cls="visual.class_embedding",
    vision_pos="visual.positional_embedding",
    pre_norm="visual.ln_pre",
    vision_blocks="visual.transformer.resblocks.",
    post_norm="visual.ln_post",
    vision_proj="visual.proj",
    block=("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"),
  ),
}


class _Rules(list):
  def add(self, target, layer, srcs, transform):
    self.append(Rule(tuple(target), layer, tuple(srcs), transform))

  def lin(self, target, layer, key, in_shape, out_shape, bias=True):
    n_in, n_out = _prod(in_shape), _prod(out_shape)
    t = linear(in_shape, out_shape)
    self.add(
      (*target, "kernel"), layer, [Src(f"{key}.weight", (n_out, n_in))], t
    )
    if bias:
      b = reshape_t(out_shape, n_out)
      self.add((*target, "bias"), layer, [Src(f"{key}.bias", (n_out,))], b)

  def norm(self, target, layer, key, dim):
    for ours, theirs in (("scale", "weight"), ("bias", "bias")):
      src = [Src(f"{key}.{theirs}", (dim,))]
      self.add((*target, ours), layer, src, identity())

  def param(self, target, key, shape):
    self.add(target, None, [Src(key, tuple(shape))], identity())

  def projection(self, target, key, width, dim, layout):
    if layout == "hf":  # nn.Linear weight [dim, width]
      self.lin((target,), None, key, width, dim, bias=False)
    else:  # a [width, dim] matrix used as x @ proj: our kernel as is
      self.param((target, "kernel"), key, (width, dim))


def _prod(shape) -> int:
  out = 1
  for s in (shape,) if isinstance(shape, int) else shape:
    out *= s
  return out


def _blocks(r: _Rules, root: str, tower, prefix: str, layout: str) -> None:
  D, H = tower.hidden_size, tower.num_attention_heads
  F, Dh = tower.intermediate_size, D // H
  ln1, ln2, out, fc1, fc2 = NAMES[layout]["block"]
  for i in range(tower.num_hidden_layers):
    b = f"{prefix}{i}"
    tgt = (root, "layers")
    r.norm((*tgt, "layer_norm1"), i, f"{b}.{ln1}", D)
    qkv = (*tgt, "self_attn", "qkv")
    if layout == "hf":
      ws = [Src(f"{b}.self_attn.{x}_proj.weight", (D, D)) for x in "qkv"]
      bs = [Src(f"{b}.self_attn.{x}_proj.bias", (D,)) for x in "qkv"]
    else:
      ws = [Src(f"{b}.attn.in_proj_weight", (3 * D, D))]
      bs = [Src(f"{b}.attn.in_proj_bias", (3 * D,))]
    r.add((*qkv, "kernel"), i, ws, linear(D, (3, H, Dh)))
    r.add((*qkv, "bias"), i, bs, reshape_t((3, H, Dh), 3 * D))
    r.lin((*tgt, "self_attn", "out_proj"), i, f"{b}.{out}", (H, Dh), D)
    r.norm((*tgt, "layer_norm2"), i, f"{b}.{ln2}", D)
    r.lin((*tgt, "mlp", "fc1"), i, f"{b}.{fc1}", D, F)
    r.lin((*tgt, "mlp", "fc2"), i, f"{b}.{fc2}", F, D)


def rules(c: CLIPConfig, layout: str) -> list[Rule]:
  """The key table of ``layout`` ("hf" or "openclip") for config ``c``."""
  r, n, P = _Rules(), NAMES[layout], c.projection_dim
  if (t := c.text) is not None:
    D, root = t.hidden_size, "text_model"
    r.param(
      (root, "token_embedding", "embedding"), n["token"], (t.vocab_size, D)
    )
    r.param(
      (root, "position_embedding"),
      n["text_pos"],
      (t.max_position_embeddings, D),
    )
    _blocks(r, root, t, n["text_blocks"], layout)
    r.norm((root, "final_layer_norm"), None, n["final_norm"], D)
    if P is not None:
      r.projection("text_projection", n["text_proj"], D, P, layout)
  if (v := c.vision) is not None:
    D, p, C, root = v.hidden_size, v.patch_size, v.num_channels, "vision_model"
    r.add(
      (root, "patch_embedding", "kernel"),
      None,
      [Src(n["patch"], (D, C, p, p))],
      conv2d(),
    )
    r.param((root, "class_embedding"), n["cls"], (D,))
    r.param((root, "position_embedding"), n["vision_pos"], (v.num_positions, D))
    r.norm((root, "pre_layrnorm"), None, n["pre_norm"], D)
    _blocks(r, root, v, n["vision_blocks"], layout)
    r.norm((root, "post_layernorm"), None, n["post_norm"], D)
    if P is not None:
      r.projection("visual_projection", n["vision_proj"], D, P, layout)
  if c.has_logit_scale:
    r.param(("logit_scale",), "logit_scale", ())
  return list(r)


def hf_rules(c: CLIPConfig) -> list[Rule]:
  """Key table for the transformers layout."""
  return rules(c, "hf")


def openclip_rules(c: CLIPConfig) -> list[Rule]:
  """Key table for OpenCLIP ``CLIP`` state dicts."""
  return rules(c, "openclip")


RULES = {"hf": hf_rules, "openclip": openclip_rules}
