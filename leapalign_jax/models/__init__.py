"""Flax NNX models: Flux DiT, its autoencoder, CLIP and T5 encoders.

Owns the architectures only (SD3's MMDiT, BLIP/ImageReward and the reward
heads too): no training, no file formats (``convert``), no config files.

Parameters carry logical sharding annotations but are never sharded eagerly:
``leapalign_jax.sharding`` places them explicitly (``eval_shape`` → jit with
``out_shardings``), so models can be built and traced without a mesh.
"""

import flax

# The process-wide default, not ``nnx.use_eager_sharding(False)``: that sets a
# thread-local stack, and models are also built on other threads (the digits
# world trains its reward beside the autoencoder).
flax.config.update("flax_always_shard_variable", False)
