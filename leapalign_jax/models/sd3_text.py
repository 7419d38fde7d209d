"""SD3's text conditioning from CLIP-L, CLIP-G and T5 (the pipeline's rule).

``StableDiffusion3Pipeline.encode_prompt``: each CLIP gives its
second-to-last block's token states (77 x 768 and 77 x 1280, before the final
LayerNorm) and its projected pooled vector; the token states are joined
along channels (2048), zero-padded to T5's width (4096) and put in front of
T5's states along the sequence (77 + 256 tokens at the default lengths); the
pooled vectors are joined (768 + 1280 = 2048). Without T5 its part is zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sd3_conditioning(
  clip_l,
  clip_g,
  t5,
  ids_l: jax.Array,
  ids_g: jax.Array,
  ids_t5: jax.Array,
  *,
  t5_width: int = 4096,
) -> tuple[jax.Array, jax.Array]:
  """``(context [B, 77 + S, t5_width], pooled [B, P_l + P_g])``, float32.

  Args:
    clip_l, clip_g: ``models.clip.CLIP`` text towers with projections.
    t5: a ``models.t5.T5Encoder``, or None (its part is then zeros).
    ids_l, ids_g: CLIP token ids ``[B, 77]`` (each with its tokenizer).
    ids_t5: T5 ids ``[B, S]`` (only the length is used when ``t5`` is None).
    t5_width: the joint width (T5's ``d_model``; the transformer's
      ``context_in_dim``).
  """
  out_l, states_l = clip_l.encode_text_penultimate(ids_l)
  out_g, states_g = clip_g.encode_text_penultimate(ids_g)
  pooled = jnp.concatenate(
    [
      clip_l.text_projection(out_l.pooled).astype(jnp.float32),
      clip_g.text_projection(out_g.pooled).astype(jnp.float32),
    ],
    axis=-1,
  )
  states = jnp.concatenate([states_l, states_g], axis=-1).astype(jnp.float32)
  if states.shape[-1] > t5_width:
    raise ValueError(
      f"CLIP states are {states.shape[-1]} wide, more than the T5 width "
      f"{t5_width}"
    )
  states = jnp.pad(states, ((0, 0), (0, 0), (0, t5_width - states.shape[-1])))
  B, S = ids_t5.shape
  if t5 is None:
    t5_states = jnp.zeros((B, S, t5_width), jnp.float32)
  else:
    t5_states = t5(ids_t5).astype(jnp.float32)
  return jnp.concatenate([states, t5_states], axis=1), pooled
