"""leapalign_jax: LeapAlign post-training of Flux-class flow models in JAX/Flax NNX."""

import pathlib
import re

import setuptools

_HERE = pathlib.Path(__file__).parent
_VERSION = re.search(
  r'__version__ = "([^"]+)"',
  (_HERE / "leapalign_jax" / "__init__.py").read_text(),
).group(1)

# Lower bounds only: exact versions for CI live in constraints.txt, and
# accelerator images that ship newer jax/flax install with --no-deps.
INSTALL_REQUIRES = [
  "jax>=0.10.2",
  "jaxlib>=0.10.2",
  "flax>=0.12.8",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12.8",
  "ml_collections>=1.1.0",
  "clu>=0.0.12",
  "chex>=0.1.92",
  "einops>=0.8.2",
  "grain>=0.2.18",
  "transformers>=5.23.0",
  "tokenizers>=0.23.3",
  "sentencepiece>=0.2.3",
  # OpenCLIP's text pipeline, for rewards trained with it (HPSv2): ftfy
  # (pure Python, with wcwidth) and regex (transformers needs it too).
  "ftfy>=6.3.1",
  "regex>=2026.11.19",
  "safetensors>=0.8.0",
  "numpy>=2.0",
  "ml_dtypes>=0.5.0",
  "pillow>=10.0",
  "tqdm>=4.66",
  "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
  "absl-py>=2.1",
  "scikit-learn>=1.5",  # the embedded digits world (load_digits)
  # gs:// workdirs, weights and caches (fileio, staging; orbax's checkpoints
  # reach GCS through etils.epath, which needs it without TensorFlow).
  "fsspec>=2026.9.0",
  "gcsfs>=2026.10.1",
]

# torch is a parity reference and an optional converter input only; never
# imported at training or sampling time. Pin it exactly: any other version
# resolves to a multi-GB CUDA download on the project's machines.
TORCH_EXTRA = ["torch==2.13.0"]

TFDS_EXTRA = ["tensorflow-datasets>=4.9.10"]  # tfds: prompt sources

# GPUs: jax's CUDA plugin and the CUDA/cuDNN wheels it names, matched to the
# jax that constraints.txt pins (`pip install -c constraints.txt -e
# ".[cuda13]"`). Images that ship a newer jax install with --no-deps instead.
EXTRAS_REQUIRE = {
  "cuda12": ["jax[cuda12]>=0.10.2"],
  "cuda13": ["jax[cuda13]>=0.10.2"],
  "tfds": TFDS_EXTRA,
  "torch": TORCH_EXTRA,
  "convert": TORCH_EXTRA,
  "test": TORCH_EXTRA
  + TFDS_EXTRA
  + [
    "diffusers>=0.42.1",
    "peft>=0.21.2",  # diffusers' LoRA loading (tests/lora_test.py)
    "scikit-image>=0.24",
    "pytest>=8.0",
    "ruff>=0.6",
    # The pod-fit check compiles for TPU topologies on a CPU host: jax[tpu]
    # pins the libtpu matching jax (tests/aot_test.py).
    "jax[tpu]>=0.10.2",
    # notebooks/ executed top to bottom (tests/notebook_test.py).
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    "matplotlib>=3.8",
    # A local GCS server for the gs:// workdir and staging tests.
    "gcp-storage-emulator>=2026.7.19",
  ],
}

setuptools.setup(
  name="leapalign_jax",
  version=_VERSION,
  description=(
    "LeapAlign (two-step leap trajectories) reward fine-tuning of Flux in"
    " JAX/Flax NNX, with ReFL/DRaFT/DRTune/full-backprop baselines."
  ),
  long_description=(_HERE / "README.md").read_text(),
  long_description_content_type="text/markdown",
  python_requires=">=3.11",
  packages=setuptools.find_packages(
    include=["leapalign_jax", "leapalign_jax.*"]
  ),
  package_data={"leapalign_jax": ["assets/*"]},
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS_REQUIRE,
  license="Apache-2.0",
)
