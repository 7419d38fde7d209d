"""Test environment: 8 fake CPU devices, strict numerics, offline hub.

These settings must run before JAX is imported anywhere, which is why they
live at the top of the root conftest.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# Identical programs (a resumed run, the same method twice) compile once per
# session.
jax.config.update(
  "jax_compilation_cache_dir",
  os.environ.get("LEAPALIGN_TEST_JAX_CACHE")
  or os.path.join(tempfile.gettempdir(), f"leapalign-jax-cache-{os.getpid()}"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Tests compare against fp32 references: make matmuls full precision.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  del config
  platforms = {d.platform for d in jax.devices()}
  for item in items:
    if "gpu" in item.keywords and "gpu" not in platforms:
      item.add_marker(pytest.mark.skip(reason="needs a GPU"))
    if "tpu" in item.keywords and "tpu" not in platforms:
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
