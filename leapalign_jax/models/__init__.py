"""Flax NNX models: Flux DiT, its autoencoder, CLIP and T5 encoders.

Parameters carry logical sharding annotations but are never sharded eagerly:
``leapalign_jax.sharding`` places them explicitly (``eval_shape`` → jit with
``out_shardings``), so models can be built and traced without a mesh.
"""

from flax import nnx

nnx.use_eager_sharding(False)
