"""CLIP text and vision towers (transformers ``CLIPModel``) in Flax NNX.

One ``CLIP`` module holds either tower or both, with their optional
projections, so the same code serves Flux's CLIP-L text encoder (pooled text
output, no projection) and the ViT-H-14 reward backbones (HPSv2.1 in the
OpenCLIP layout, PickScore in the transformers layout). Parameter names follow
transformers; the layouts on disk are mapped by ``leapalign_jax.convert.clip``.

Layout differences from the PyTorch checkpoints (exact re-arrangements):
- q, k and v are one ``[embed, 3, heads, head_dim]`` kernel (``self_attn.qkv``)
  and the output projection is ``[heads, head_dim, embed]``;
- the patch embedding is a Linear over flattened ``(p, p, C)`` patches of an
  NHWC image, kernel ``[p, p, C, embed]`` (the conv weight transposed).

Both towers are pre-LN transformers whose identical blocks are stacked on a
``layers`` axis and run with ``lax.scan`` under the configured remat policy.
Images are NHWC, already resized and normalised by the caller.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from leapalign_jax.models import attention as attn_lib
from leapalign_jax.models.layers import (
  ACT_BLD,
  Embed,
  LayerNorm,
  Linear,
  constrain,
  gelu,
  heads_out_linear,
  qkv_linear,
  quick_gelu,
  run_layers,
  stack_layers,
)

ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


def _check_tower(name: str, width: int, heads: int, act: str) -> None:
  if width % heads:
    raise ValueError(
      f"{name}: hidden_size {width} is not divisible by num_attention_heads "
      f"{heads}"
    )
  if act not in ACTIVATIONS:
    raise ValueError(
      f"{name}: unknown hidden_act {act!r}; use one of {sorted(ACTIVATIONS)}"
    )


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Text tower sizes (field names as in transformers ``CLIPTextConfig``)."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"  # OpenAI: quick_gelu; OpenCLIP/laion: gelu
  layer_norm_eps: float = 1e-5
  # Pooling position: None pools at argmax(ids) (OpenAI/OpenCLIP, and
  # transformers when its config says eos_token_id == 2); an id pools at the
  # first occurrence of that id (transformers' rule for any other id).
  eos_token_id: int | None = None

  def __post_init__(self):
    _check_tower(
      "text", self.hidden_size, self.num_attention_heads, self.hidden_act
    )


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Vision tower sizes (field names as in transformers ``CLIPVisionConfig``)."""

  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    _check_tower(
      "vision", self.hidden_size, self.num_attention_heads, self.hidden_act
    )
    if self.image_size % self.patch_size:
      raise ValueError(
        f"image_size {self.image_size} is not a multiple of patch_size "
        f"{self.patch_size}"
      )

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Which towers exist, their sizes, and numerics/compilation knobs.

  ``projection_dim`` None means no projections (``CLIPTextModel``); a model
  with both towers and projections also holds ``logit_scale``.
  """

  text: CLIPTextConfig | None = CLIPTextConfig()
  vision: CLIPVisionConfig | None = CLIPVisionConfig()
  projection_dim: int | None = 768
  # Numerics / compilation (not part of the checkpoint).
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots | names
  scan_layers: bool = True
  attention: str = "xla"  # auto | xla | cudnn | splash (text: causal)

  def __post_init__(self):
    if self.text is None and self.vision is None:
      raise ValueError("a CLIPConfig needs a text or a vision tower")

  @property
  def has_logit_scale(self) -> bool:
    return (
      self.text is not None
      and self.vision is not None
      and self.projection_dim is not None
    )

  def with_towers(self, towers) -> CLIPConfig:
    """This config restricted to ``towers`` (a subset of text, vision)."""
    unknown = set(towers) - {"text", "vision"}
    if unknown or not towers:
      raise ValueError("towers must be a non-empty subset of (text, vision)")
    return dataclasses.replace(
      self,
      text=self.text if "text" in towers else None,
      vision=self.vision if "vision" in towers else None,
    )

  def with_activation(self, act: str) -> CLIPConfig:
    """This config with ``act`` in every tower (e.g. ``"quick_gelu"``)."""
    return dataclasses.replace(
      self,
      text=self.text and dataclasses.replace(self.text, hidden_act=act),
      vision=self.vision and dataclasses.replace(self.vision, hidden_act=act),
    )


_L14_TEXT = CLIPTextConfig()
_L14_VISION = CLIPVisionConfig()
_H14_TEXT = CLIPTextConfig(
  hidden_size=1024,
  intermediate_size=4096,
  num_hidden_layers=24,
  num_attention_heads=16,
  hidden_act="gelu",
)
_H14_VISION = CLIPVisionConfig(
  hidden_size=1280,
  intermediate_size=5120,
  num_hidden_layers=32,
  num_attention_heads=16,
  hidden_act="gelu",
)

# OpenCLIP's g/14 and bigG/14 (open_clip model_configs ViT-g-14.json and
# ViT-bigG-14.json): their vision heads are 88 and 104 wide, not 64, so the
# head counts cannot be guessed from the widths.
_G14_VISION = CLIPVisionConfig(
  hidden_size=1408,
  intermediate_size=6144,
  num_hidden_layers=40,
  num_attention_heads=16,
  hidden_act="gelu",
)
_BIGG14_VISION = CLIPVisionConfig(
  hidden_size=1664,
  intermediate_size=8192,
  num_hidden_layers=48,
  num_attention_heads=16,
  hidden_act="gelu",
)
_BIGG14_TEXT = CLIPTextConfig(
  hidden_size=1280,
  intermediate_size=5120,
  num_hidden_layers=32,
  num_attention_heads=20,
  hidden_act="gelu",
)

VARIANTS: dict[str, CLIPConfig] = {
  # openai/clip-vit-large-patch14 (both towers; the LAION aesthetic head).
  "vit-l-14": CLIPConfig(_L14_TEXT, _L14_VISION, 768),
  # Flux's text_encoder/: the CLIP-L text tower alone (CLIPTextModel).
  "vit-l-14-text": CLIPConfig(_L14_TEXT, None, None),
  # SD3's text_encoder / text_encoder_2: CLIP-L and OpenCLIP bigG-14 text
  # towers with their projections (CLIPTextModelWithProjection).
  "sd3-clip-l": CLIPConfig(_L14_TEXT, None, 768),
  "sd3-clip-g": CLIPConfig(_BIGG14_TEXT, None, 1280),
  # OpenCLIP / laion ViT-H-14: HPSv2.1 (OpenCLIP layout) and PickScore
  # (transformers layout). Exact GELU.
  "vit-h-14": CLIPConfig(_H14_TEXT, _H14_VISION, 1024),
  "vit-g-14": CLIPConfig(_H14_TEXT, _G14_VISION, 1024),
  "vit-bigg-14": CLIPConfig(_BIGG14_TEXT, _BIGG14_VISION, 1280),
  "tiny": CLIPConfig(
    CLIPTextConfig(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
    ),
    CLIPVisionConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=16,
      patch_size=4,
    ),
    16,
  ),
}


# OpenCLIP's model config names, with OpenCLIP's activations: exact GELU
# unless the name ends in -quickgelu. Note "ViT-L-14" (laion, GELU) is not
# our "vit-l-14" (OpenAI, quick_gelu), which OpenCLIP calls
# "ViT-L-14-quickgelu".
_OPENCLIP = {
  "ViT-L-14": VARIANTS["vit-l-14"].with_activation("gelu"),
  "ViT-H-14": VARIANTS["vit-h-14"],
  "ViT-g-14": VARIANTS["vit-g-14"],
  "ViT-bigG-14": VARIANTS["vit-bigg-14"],
}
for _name, _config in tuple(_OPENCLIP.items()):
  if _name != "ViT-g-14":  # open_clip has no ViT-g-14-quickgelu
    _OPENCLIP[_name + "-quickgelu"] = _config.with_activation("quick_gelu")
VARIANTS.update(_OPENCLIP)


def causal_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla"
) -> jax.Array:
  """Causal softmax attention over ``[B, L, H, D]``; logits in float32.

  ``impl`` resolving to ``cudnn`` uses cuDNN's fused causal kernel (padded
  like the bidirectional one); anything else runs the plain XLA version
  (text sequences are short: 77 tokens).
  """
  if attn_lib.resolve(impl, q.dtype) == "cudnn":
    return attn_lib.cudnn_attention(q, k, v, is_causal=True)
  L = q.shape[1]
  logits = jnp.einsum(
    "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
  )
  logits = logits * (1.0 / math.sqrt(q.shape[-1]))
  allowed_LL = jnp.tril(jnp.ones((L, L), jnp.bool_))
  logits = jnp.where(allowed_LL[None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with a fused qkv kernel."""

  def __init__(self, width: int, heads: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = qkv_linear(width, heads, width // heads, **kw)
    self.out_proj = heads_out_linear(heads, width // heads, width, **kw)

  def __call__(self, x_BLD: jax.Array, *, causal: bool, impl: str):
    qkv = checkpoint_name(self.qkv(x_BLD), "qkv")  # [B, L, 3, H, Dh]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if causal:
      out = causal_attention(q, k, v, impl=impl)
    else:
      out = attn_lib.attention(q, k, v, impl=impl)
    return self.out_proj(checkpoint_name(out, "attn_out"))


class CLIPMLP(nnx.Module):
  """``fc2(act(fc1(x)))``."""

  def __init__(self, width, hidden, act: str, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = ACTIVATIONS[act]
    self.fc1 = Linear(width, hidden, kernel_axes=("embed", "mlp"), **kw)
    self.fc2 = Linear(
      hidden, width, kernel_axes=("mlp", "embed"), bias_axes=("bias",), **kw
    )

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    return self.fc2(self.act(checkpoint_name(self.fc1(x_BLD), "mlp_in")))


class CLIPEncoderLayer(nnx.Module):
  """Pre-LN block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

  def __init__(self, tower, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    D, eps = tower.hidden_size, tower.layer_norm_eps
    self.layer_norm1 = LayerNorm(D, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = CLIPAttention(D, tower.num_attention_heads, **kw)
    self.layer_norm2 = LayerNorm(D, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = CLIPMLP(D, tower.intermediate_size, tower.hidden_act, **kw)

  def __call__(self, x_BLD, *, causal: bool, impl: str) -> jax.Array:
    x_BLD = x_BLD + self.self_attn(
      self.layer_norm1(x_BLD), causal=causal, impl=impl
    )
    x_BLD = x_BLD + self.mlp(self.layer_norm2(x_BLD))
    return constrain(x_BLD, ACT_BLD)


def _encoder(tower, config: CLIPConfig, rngs: nnx.Rngs):
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  return stack_layers(
    lambda r: CLIPEncoderLayer(
      tower, dtype=dtype, param_dtype=param_dtype, rngs=r
    ),
    tower.num_hidden_layers,
    rngs,
  )


class TowerOutput(NamedTuple):
  """Per-token states and the pooled vector of one tower (before projection)."""

  last_hidden_state: jax.Array  # [B, L, D]
  pooled: jax.Array  # [B, D]


class CLIPTextTransformer(nnx.Module):
  """Token + learned position embeddings, causal pre-LN blocks, final LN."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    t = config.text
    param_dtype = jnp.dtype(config.param_dtype)
    self.token_embedding = Embed(
      t.vocab_size,
      t.hidden_size,
      dtype=jnp.dtype(config.dtype),
      param_dtype=param_dtype,
      rngs=rngs,
    )
    pos = 0.01 * jax.random.normal(
      rngs.params(), (t.max_position_embeddings, t.hidden_size), param_dtype
    )
    self.position_embedding = nnx.Param(pos, out_sharding=(None, "embed"))
    self.layers = _encoder(t, config, rngs)
    self.final_layer_norm = LayerNorm(
      t.hidden_size, eps=t.layer_norm_eps, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, ids_BL: jax.Array) -> TowerOutput:
    return self.forward(ids_BL, penultimate=False)[0]

  def forward(self, ids_BL: jax.Array, penultimate: bool):
    """``(TowerOutput, penultimate states [B, L, D] or None)``.

    The penultimate states are those after the second-to-last block, before
    the final LayerNorm (transformers' ``hidden_states[-2]``: SD3's CLIP
    conditioning).
    """
    c, t = self.config, self.config.text
    length = ids_BL.shape[-1]
    if ids_BL.ndim != 2 or length > t.max_position_embeddings:
      raise ValueError(
        f"text ids must be [B, L] with L <= {t.max_position_embeddings}; "
        f"got {ids_BL.shape}"
      )
    pos_LD = self.position_embedding[:length].astype(jnp.dtype(c.dtype))
    x_BLD = constrain(self.token_embedding(ids_BL) + pos_LD[None], ACT_BLD)
    groups = _split_last(self.layers) if penultimate else (self.layers,)
    states = []
    for layers in groups:
      x_BLD = run_layers(
        layers,
        x_BLD,
        lambda layer, x: layer(x, causal=True, impl=c.attention),
        remat=c.remat,
        scan=c.scan_layers,
      )
      states.append(x_BLD)
    x_BLD = self.final_layer_norm(x_BLD)
    if t.eos_token_id is None:
      pos_B = jnp.argmax(ids_BL, axis=-1)
    else:  # argmax returns the first maximum: the first eos
      pos_B = jnp.argmax(ids_BL == t.eos_token_id, axis=-1)
    pooled_BD = jnp.take_along_axis(x_BLD, pos_B[:, None, None], axis=1)[:, 0]
    return TowerOutput(x_BLD, pooled_BD), states[0] if penultimate else None


def _split_last(layers: nnx.Module) -> tuple[nnx.Module, nnx.Module]:
  """Stacked ``layers`` as (all but the last, the last), both stacked."""
  graphdef, state = nnx.split(layers)
  if jax.tree.leaves(state)[0].shape[0] < 2:
    raise ValueError("the penultimate states need at least two layers")
  return (
    nnx.merge(graphdef, jax.tree.map(lambda a: a[:-1], state)),
    nnx.merge(graphdef, jax.tree.map(lambda a: a[-1:], state)),
  )


class CLIPVisionTransformer(nnx.Module):
  """Patch embedding + class token + positions, pre-LN, blocks, post-LN."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    v = config.vision
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    D, p = v.hidden_size, v.patch_size
    self.patch_embedding = Linear(
      (p, p, v.num_channels),
      D,
      kernel_axes=(None, None, None, "embed"),
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.class_embedding = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (D,), param_dtype),
      out_sharding=("embed",),
    )
    pos = 0.02 * jax.random.normal(
      rngs.params(), (v.num_positions, D), param_dtype
    )
    self.position_embedding = nnx.Param(pos, out_sharding=(None, "embed"))
    norm_kw = dict(eps=v.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.pre_layrnorm = LayerNorm(D, **norm_kw)  # (sic) transformers' name
    self.layers = _encoder(v, config, rngs)
    self.post_layernorm = LayerNorm(D, **norm_kw)

  def __call__(self, pixels_BHWC: jax.Array) -> TowerOutput:
    c, v = self.config, self.config.vision
    size, C = v.image_size, v.num_channels
    if pixels_BHWC.ndim != 4 or pixels_BHWC.shape[1:] != (size, size, C):
      raise ValueError(
        f"images must be [B, {size}, {size}, {C}] (NHWC, resized by the "
        "caller); got "
        f"{pixels_BHWC.shape}"
      )
    B, p, n = pixels_BHWC.shape[0], v.patch_size, size // v.patch_size
    # Row-major patches, the order of the reference conv's flattened output.
    patches = pixels_BHWC.reshape(B, n, p, n, p, C).transpose(0, 1, 3, 2, 4, 5)
    x_BND = self.patch_embedding(patches.reshape(B, n * n, p, p, C))
    dtype = x_BND.dtype
    cls_B1D = jnp.broadcast_to(
      self.class_embedding[...].astype(dtype)[None, None],
      (B, 1, x_BND.shape[2]),
    )
    x_BND = jnp.concatenate([cls_B1D, x_BND], axis=1)
    x_BND = x_BND + self.position_embedding[...].astype(dtype)[None]
    x_BND = self.pre_layrnorm(x_BND)
    x_BND = run_layers(
      self.layers,
      constrain(x_BND, ACT_BLD),
      lambda layer, x: layer(x, causal=False, impl=c.attention),
      remat=c.remat,
      scan=c.scan_layers,
    )
    return TowerOutput(x_BND, self.post_layernorm(x_BND[:, 0]))


class CLIP(nnx.Module):
  """CLIP text and/or vision towers with optional projections.

  ``text_features`` / ``image_features`` are the calls the rest of the package
  uses: Flux conditioning takes ``text_features(ids, project=False)`` (the
  CLIP-L pooled output), rewards take projected features.
  """

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = c = config
    kw = dict(
      use_bias=False,
      dtype=jnp.dtype(c.dtype),
      param_dtype=jnp.dtype(c.param_dtype),
      rngs=rngs,
    )
    P, T, V = c.projection_dim, c.text, c.vision
    # Each attribute is assigned once: NNX fixes an attribute's data/static
    # status at its first assignment (a None would make it static).
    self.text_model = None if T is None else CLIPTextTransformer(c, rngs=rngs)
    self.text_projection = (
      Linear(T.hidden_size, P, kernel_axes=("embed", None), **kw)
      if T is not None and P is not None
      else None
    )
    self.vision_model = (
      None if V is None else CLIPVisionTransformer(c, rngs=rngs)
    )
    self.visual_projection = (
      Linear(V.hidden_size, P, kernel_axes=("embed", None), **kw)
      if V is not None and P is not None
      else None
    )
    # log(1 / 0.07), CLIP's initial temperature.
    self.logit_scale = (
      nnx.Param(
        jnp.asarray(math.log(1 / 0.07), jnp.dtype(c.param_dtype)),
        out_sharding=(),
      )
      if c.has_logit_scale
      else None
    )

  def encode_text(self, ids_BL: jax.Array) -> TowerOutput:
    """Final-LN token states ``[B, L, D]`` and the pooled EOS state ``[B, D]``."""
    if self.text_model is None:
      raise ValueError("this CLIP model was built without its text tower")
    return self.text_model(ids_BL)

  def encode_text_penultimate(self, ids_BL: jax.Array):
    """``(encode_text(ids), second-to-last block's states [B, L, D])``."""
    if self.text_model is None:
      raise ValueError("this CLIP model was built without its text tower")
    return self.text_model.forward(ids_BL, penultimate=True)

  def encode_image(self, pixels_BHWC: jax.Array) -> TowerOutput:
    """Token states ``[B, N+1, D]`` and the post-LN class token ``[B, D]``."""
    if self.vision_model is None:
      raise ValueError("this CLIP model was built without its vision tower")
    return self.vision_model(pixels_BHWC)

  def text_features(self, ids_BL: jax.Array, *, project: bool = True):
    """Text features ``[B, P]`` (or the pooled ``[B, D]``), float32.

    Args:
      ids_BL: token ids, padded to a fixed length (77 for CLIP).
      project: apply ``text_projection``; requires one unless False.
    """
    pooled = self.encode_text(ids_BL).pooled
    return self._project(pooled, self.text_projection, project, "text")

  def image_features(self, pixels_BHWC: jax.Array, *, project: bool = True):
    """Image features ``[B, P]`` (or the pooled ``[B, D]``), float32.

    Args:
      pixels_BHWC: normalised images at the configured size, NHWC.
      project: apply ``visual_projection``; requires one unless False.
    """
    pooled = self.encode_image(pixels_BHWC).pooled
    return self._project(pooled, self.visual_projection, project, "visual")

  @staticmethod
  def _project(pooled, projection, project: bool, name: str) -> jax.Array:
    if project:
      if projection is None:
        raise ValueError(
          f"this CLIP model has no {name} projection; pass project=False for "
          "the pooled output"
        )
      pooled = projection(pooled)
    return pooled.astype(jnp.float32)
