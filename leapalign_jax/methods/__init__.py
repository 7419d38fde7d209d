"""Registry of reward fine-tuning methods: ``get(name) -> Method``.

Every method shares the interface of :mod:`leapalign_jax.methods.base`:
``Method(loss_and_grad, sample_choice)`` over a :class:`Problem`. Owns the
methods' math and their config defaults; it sees a model only as the
``Problem``'s velocity and reward functions (never a model family).
"""

from leapalign_jax.methods import (
  draft,
  drtune,
  full_bp,
  grpo_step,
  leapalign,
  refl,
)
from leapalign_jax.methods.base import (
  REFERENCE_NUM_STEPS,
  Method,
  Problem,
  scale_steps,
)
from leapalign_jax.methods.defaults import get_config as default_config

_REGISTRY: dict[str, Method] = {
  "leapalign": leapalign.METHOD,
  "refl": refl.METHOD,
  "draft_lv": draft.METHOD_LV,
  "draft_k": draft.METHOD_K,
  "drtune": drtune.METHOD,
  "full_backprop": full_bp.METHOD,
  # The policy-gradient family (methods/grpo.py, methods/grpo_step.py).
  **{
    name: Method(None, grpo_step.sample_choice(name), grpo_step.make_step(name))
    for name in ("flow_grpo", "dance_grpo", "mix_grpo")
  },
}


def names() -> tuple[str, ...]:
  """Registered method names."""
  return tuple(_REGISTRY)


def get(name: str) -> Method:
  """The method registered under ``name``; ValueError lists valid names."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(
      f"Unknown method {name!r}; valid methods: {', '.join(names())}."
    ) from None


__all__ = [
  "REFERENCE_NUM_STEPS",
  "Method",
  "Problem",
  "default_config",
  "get",
  "names",
  "scale_steps",
]
