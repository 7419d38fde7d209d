"""LeapAlign post-training of Flux-class rectified-flow models in JAX/Flax NNX.

The package is layered, and imports point down (``docs/architecture.md``):
base helpers (errors, files, locks, sharding, checkpoints) -> ``models`` ->
the library (``sampling``, ``leap``, ``methods``, ``rewards``, ``convert``,
``flops``, ``step``, ``prompts``, ``staging``, ``data``) -> ``families``
(the flow-model interface) -> the assembly (``components``,
``abstract_run``) -> services (``evaluation``, ``generation``, ``export``,
``worlds``) -> commands (``train``, ``evaluate``, ``sample``, ``aot``,
``embed_prompts``) -> ``main``.
"""

__version__ = "0.1.0"
