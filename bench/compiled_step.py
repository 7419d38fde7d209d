"""Shared by the benchmarks: the real train step of a config, compiled."""

import jax
import numpy as np

from leapalign_jax import components, methods, sharding, worlds
from leapalign_jax import step as step_lib


def compile_step(config, workdir):
  """Prepares the world, loads it and compiles one train step.

  Returns:
    ``(compiled, args, comps)``: ``compiled(*args)`` runs the step on the
    first batch; ``compiled.memory_analysis()`` has its memory figures.
  """
  config = worlds.prepare(config, workdir)
  mesh = sharding.mesh_from_config(config.mesh)
  comps = components.load(config, mesh)
  tx = step_lib.make_optimizer(config.optim)
  state = comps.init_state(tx)
  fn = jax.jit(
    step_lib.make_train_step(config, comps.step_fns, tx, comps.sigmas)
  )
  batch = sharding.put_batch(
    comps.batch_to_arrays(comps.train_batches()[0]), mesh
  )
  choice = step_lib.host_choice(
    config, methods.get(config.method), 0, comps.sigmas
  )
  choice = {k: np.int32(v) for k, v in choice.items()}
  args = (state, comps.frozen, batch, choice)
  return fn.lower(*args).compile(), args, comps
