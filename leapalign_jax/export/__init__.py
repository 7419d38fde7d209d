"""Export of a run's EMA weights for PyTorch tools (end of run, or later).

LoRA runs write ``pytorch_lora_weights.safetensors`` (diffusers/PEFT keys,
loaded by ``FluxPipeline.load_lora_weights(folder)`` and ComfyUI) plus
``lora_info.json`` and a short README; with ``export.lora_merged`` they also
write the fused weights. Full fine-tunes write a diffusers ``transformer/``
folder or, for ``export.layout="bfl"``, one BFL file. Every process takes part
in gathering arrays that span hosts; only process 0 writes.

The LoRA file keeps the adapters' training precision (``lora.param_dtype``,
fp32 by default): it is small, and rounding the scaled ``lora_B`` to bf16
would move every update by up to 0.4%. ``export.dtype`` applies to full and
fused weights. ``python -m leapalign_jax.export`` re-exports any checkpoint
of a workdir (``export.workdir``).
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
from leapalign_jax.errors import UserError

LORA_INFO = "lora_info.json"
# What an export writes: the LoRA file (+ info), fused weights, full weights.
PARTS = ("lora", "merged", "full")

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


def default_parts(comps) -> tuple[str, ...]:
  """What the run's config exports: its LoRA file (+ fused), or full weights."""
  if not comps.lora_paths:
    return ("full",)
  merged = comps.config.export.get("lora_merged", False)
  return ("lora", "merged") if merged else ("lora",)


def _check_parts(comps, parts) -> tuple[str, ...]:
  parts = tuple(parts)
  if not parts or set(parts) - set(PARTS):
    raise UserError(f"export parts {parts}: use a non-empty subset of {PARTS}")
  if comps.lora_paths and "full" in parts:
    raise UserError(
      "a LoRA run has no full weights of its own: export its adapters "
      "(lora) or the adapters fused into the base (merged)"
    )
  if not comps.lora_paths and set(parts) & {"lora", "merged"}:
    raise UserError(
      "this run trained every weight (lora.enabled=False): it has no "
      "adapters; export its full weights"
    )
  return parts


def export_run(
  comps,
  ema_params: Any,
  folder: str,
  *,
  parts=None,
  layout: str | None = None,
  dtype: str | None = None,
) -> list[str]:
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
    parts: a subset of ``PARTS``; default ``default_parts(comps)``.
    layout: of full / fused weights (default ``export.layout``).
    dtype: of every file written (default: ``export.dtype`` for full and
      fused weights, the adapters' own for the LoRA file).

  Returns:
    The paths written (empty on processes other than 0).
  """
  cfg = comps.config.export
  parts = _check_parts(comps, parts or default_parts(comps))
  layout = layout or cfg.layout
  full_dtype = dtype or cfg.dtype
  writer = jax.process_index() == 0
  frozen = None
  if not comps.lora_paths:
    params = gather_to_host(ema_params, dtype=full_dtype, keep=writer)
  else:
    # Adapters are small; the frozen base is only read for a fused export.
    params = gather_to_host(ema_params, keep=writer)
    frozen = comps.frozen["model"]
    if "merged" in parts:
      frozen = gather_to_host(frozen, dtype=full_dtype, keep=writer)
  if not writer:
    return []
  with fileio.publish_dir(folder) as tmp:
    written = _write(comps, params, frozen, tmp, parts, layout, dtype)
  written = [fileio.join(folder, os.path.relpath(p, tmp)) for p in written]
  _LOG.info("exported %s", ", ".join(written))
  return written


def _write(comps, params, frozen, folder, parts, layout, dtype) -> list[str]:
  """The export files of ``export_run`` (process 0), under ``folder``."""
  family = comps.family
  full_dtype = dtype or comps.config.export.dtype
  if not comps.lora_paths:
    return family.export(comps.model(params), folder, layout, full_dtype)
  model = nnx.merge(comps.graphdef, params, frozen)
  written = []
  if "lora" in parts:
    written += family.export_lora(model, folder, dtype)
    written += _write_info(comps, folder, written[0])
  if "merged" in parts:
    written += family.export_merged(model, folder, layout, full_dtype)
  return written


def _write_info(comps, folder: str, lora_file: str) -> list[str]:
  """``lora_info.json`` and a README saying what the LoRA file holds."""
  config = comps.config
  infos, _ = read_header(lora_file)
  dtypes = sorted({str(i.dtype) for i in infos.values()})
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
    "dtype": ", ".join(dtypes),
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
