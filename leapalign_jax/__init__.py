"""LeapAlign post-training of Flux-class rectified-flow models in JAX/Flax NNX."""

__version__ = "0.1.0"
