"""End-of-run export of the EMA weights for PyTorch tools.

LoRA runs write ``pytorch_lora_weights.safetensors`` (diffusers/PEFT keys,
loaded by ``FluxPipeline.load_lora_weights(folder)`` and ComfyUI) plus
``lora_info.json`` and a short README; with ``export.lora_merged`` they also
write the fused weights. Full fine-tunes write a diffusers ``transformer/``
folder or, for ``export.layout="bfl"``, one BFL file. Every process takes part
in gathering arrays that span hosts; only process 0 writes.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leapalign_jax import families, fileio
from leapalign_jax.convert.safetensors_io import read_header, write_json_atomic

LORA_INFO = "lora_info.json"

_LOG = logging.getLogger(__name__)


def gather_to_host(tree: Any, *, dtype: Any = None, keep: bool = True) -> Any:
  """Makes every leaf of ``tree`` readable by this process, leaf by leaf.

  Arrays that span several hosts are gathered with ``process_allgather``
  (a collective: every process must call this with the same tree) and cast to
  ``dtype`` at once, so the host holds at most one full-precision leaf beyond
  the result. Arrays this process can already read stay on device; the
  exporter pulls them one layer at a time.

  Args:
    tree: a pytree of arrays (an ``nnx.State`` or a dict).
    dtype: cast gathered leaves to this dtype (default: keep theirs).
    keep: False drops gathered leaves (processes that will not write).
  """
  from jax.experimental import multihost_utils

  np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))

  def gather(leaf):
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
      return leaf
    host = multihost_utils.process_allgather(leaf, tiled=True)
    if not keep:
      return None
    return host if np_dtype is None else host.astype(np_dtype)

  return jax.tree.map(gather, tree)


def export_run(comps, ema_params: Any, folder: str) -> list[str]:
  """Writes a run's EMA weights under ``folder``; returns the paths written.

  The folder is built aside and swapped in whole (``fileio.publish_dir``:
  a rename locally; on ``gs://`` an upload of a folder built on the host):
  a run killed while exporting leaves the previous export, or none, never
  half of one locally; the resumed run exports again.

  Args:
    comps: the run's ``Components`` (``config``, ``family``, ``graphdef``,
      ``frozen``, ``lora_paths``, ``model(params)``).
    ema_params: the trainable EMA params (LoRA adapters, or every weight).
    folder: the export folder (created).

  Returns:
    The paths written (empty on processes other than 0).
  """
  cfg = comps.config.export
  writer = jax.process_index() == 0
  frozen = None
  if not comps.lora_paths:
    params = gather_to_host(ema_params, dtype=cfg.dtype, keep=writer)
  else:
    # Adapters are small; the frozen base is only read for a fused export.
    params = gather_to_host(ema_params, keep=writer)
    frozen = comps.frozen["model"]
    if cfg.get("lora_merged", False):
      frozen = gather_to_host(frozen, dtype=cfg.dtype, keep=writer)
  if not writer:
    return []
  with fileio.publish_dir(folder) as tmp:
    written = _write(comps, params, frozen, tmp)
  written = [fileio.join(folder, os.path.relpath(p, tmp)) for p in written]
  _LOG.info("exported %s", ", ".join(written))
  return written


def _write(comps, params: Any, frozen: Any, folder: str) -> list[str]:
  """The export files of ``export_run`` (process 0), under ``folder``."""
  cfg, family = comps.config.export, comps.family
  if not comps.lora_paths:
    return family.export(comps.model(params), folder, cfg.layout, cfg.dtype)
  model = nnx.merge(comps.graphdef, params, frozen)
  written = family.export_lora(model, folder, cfg.dtype)
  written += _write_info(comps, folder, written[0])
  if cfg.get("lora_merged", False):
    written += family.export_merged(model, folder, cfg.layout, cfg.dtype)
  return written


def _write_info(comps, folder: str, lora_file: str) -> list[str]:
  """``lora_info.json`` and a README saying what the LoRA file holds."""
  config = comps.config
  infos, _ = read_header(lora_file)
  ranks = Counter(
    i.shape[0] for k, i in infos.items() if k.endswith(".lora_A.weight")
  )
  info = {
    "base_model": families.section(config).path,
    "rank": config.lora.rank,
    "alpha": config.lora.alpha,
    "targets": list(config.lora.targets),
    "adapted_modules": list(comps.lora_paths),
    "torch_modules_by_rank": {str(r): n for r, n in sorted(ranks.items())},
    "format": "diffusers/PEFT (transformer.<module>.lora_A/lora_B.weight)",
    "scale": "alpha/rank folded into lora_B; no alpha keys (scale 1)",
    "dtype": config.export.dtype or "as trained",
  }
  info_path = os.path.join(folder, LORA_INFO)
  write_json_atomic(info_path, info)
  readme = os.path.join(folder, "README.md")
  with open(readme, "w") as f:
    f.write(
      _README.format(base=families.section(config).path, rank=config.lora.rank)
    )
  return [info_path, readme]


_README = """\
# LeapAlign LoRA for Flux

Base model: `{base}` (rank {rank}; see `lora_info.json`).

`pytorch_lora_weights.safetensors` uses diffusers/PEFT keys
(`transformer.<module>.lora_A.weight` / `.lora_B.weight`). The LoRA scale is
folded into `lora_B`, so no alpha is needed: the adapted weight is
`W + lora_B @ lora_A`. Ranks can differ between modules: a single block's
`proj_out` adds up the ranks of its separately adapted attention and MLP
input columns (`lora_info.json` lists the ranks in the file).

```python
pipe = FluxPipeline.from_pretrained(BASE, torch_dtype=torch.bfloat16)
pipe.load_lora_weights("path/to/this/folder")
```
"""
