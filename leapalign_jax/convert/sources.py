"""Opening checkpoints of any format as one read-only tensor mapping.

``open_weights`` accepts a ``.safetensors`` file, a PyTorch pickle
(``.pt``/``.pth``/``.bin``/``.ckpt``) or a transformers model folder, and
returns a source with the interface of ``TensorSource`` (``keys``,
``__getitem__`` -> numpy, ``shape``, ``renamed``, ``description``), so the
key tables treat every format alike.

PyTorch pickles are read with ``torch.load(weights_only=True)`` only (no
arbitrary code runs), memory-mapped when the file allows it; torch is
imported here lazily and is needed for nothing else.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from leapalign_jax.convert.errors import ConversionError, name_some
from leapalign_jax.convert.safetensors_io import TensorSource, open_folder
from leapalign_jax.errors import require_local

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys under which training scripts nest the state dict in a pickle.
_NESTED = ("state_dict", "model")


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{e.__class__.__name__}: {text[0] if text else ''}".rstrip(": ")


class TorchSource(Mapping[str, np.ndarray]):
  """Read-only mapping ``name -> np.ndarray`` over loaded torch tensors.

  Arrays are zero-copy views of the (possibly memory-mapped) tensors; bf16
  and fp8 are reinterpreted as ``ml_dtypes`` types, never converted.
  """

  def __init__(self, tensors: dict[str, Any], description: str):
    self._tensors = tensors
    self.description = description

  def __getitem__(self, name: str) -> np.ndarray:
    return _to_numpy(self._tensors[name], name, self.description)

  def __iter__(self):
    return iter(self._tensors)

  def __len__(self):
    return len(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensors[name].shape)

  def renamed(self, fn: Callable[[str], str | None]) -> TorchSource:
    """A view with keys passed through ``fn``; None drops a key."""
    renamed = ((fn(k), v) for k, v in self._tensors.items())
    return TorchSource(
      {k: v for k, v in renamed if k is not None}, self.description
    )


def _to_numpy(t, name: str, where: str) -> np.ndarray:
  import torch

  t = t.detach()
  reinterpret = {
    torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
    torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
  }
  if t.dtype in reinterpret:
    as_int, np_dtype = reinterpret[t.dtype]
    return t.view(as_int).numpy().view(np_dtype)
  try:
    return t.numpy()
  except TypeError:
    raise ConversionError(
      f"{where}: tensor {name!r} has dtype {t.dtype}, which numpy cannot "
      "hold; convert the checkpoint to float32/bfloat16 first"
    ) from None


def load_torch_file(path: str) -> TorchSource:
  """Reads a PyTorch pickle of tensors with ``torch.load(weights_only=True)``.

  A state dict nested under ``state_dict`` or ``model`` is unwrapped, and a
  ``module.`` prefix (DistributedDataParallel) shared by all keys is removed.

  Raises:
    ConversionError: torch is missing, the file is unreadable, or it holds
      anything but tensors.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  try:
    import torch
  except ImportError:
    raise ConversionError(
      f"{path}: reading a PyTorch pickle needs torch (pip install "
      "'torch==2.13.0'); or convert the file to .safetensors elsewhere"
    ) from None
  load = lambda mmap: torch.load(  # noqa: E731
    path, map_location="cpu", weights_only=True, mmap=mmap
  )
  try:
    try:
      obj = load(True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      obj = load(False)  # the legacy (pre-zip) format cannot be mapped
  except pickle.UnpicklingError as e:
    raise ConversionError(
      f"{path}: refused by torch.load(weights_only=True) ({_first_line(e)}); "
      "only pickles of plain tensors are read: re-save the model's "
      "state_dict() or convert it to .safetensors"
    ) from None
  except Exception as e:  # torch raises several types for corrupt archives
    raise ConversionError(
      f"{path}: not a readable PyTorch checkpoint ({_first_line(e)}); the "
      "file is corrupt or truncated, re-download it"
    ) from None
  for key in _NESTED:
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise ConversionError(
      f"{path}: holds a {type(obj).__name__}, not a state dict of tensors"
    )
  bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise ConversionError(
      f"{path}: entries {name_some(map(str, bad))} are not tensors; pass a "
      "plain state dict (or one nested under 'state_dict')"
    )
  tensors = dict(obj)
  if tensors and all(k.startswith("module.") for k in tensors):
    tensors = {k[len("module.") :]: v for k, v in tensors.items()}
  return TorchSource(tensors, path)


def open_file(path: str):
  """A ``.safetensors`` file or a PyTorch pickle as a tensor source."""
  require_local(path)
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or folder")
  if path.endswith(TORCH_SUFFIXES):
    return load_torch_file(path)
  if path.endswith(".safetensors"):
    return TensorSource.from_files([path])
  raise ConversionError(
    f"{path}: unknown weight file type; pass a .safetensors file, a PyTorch "
    f"pickle ({', '.join(TORCH_SUFFIXES)}) or a model folder"
  )


def open_weights(path: str, subfolders: Sequence[str] = ()) -> tuple[Any, dict]:
  """Opens a weight file or a transformers model folder.

  A folder is read as ``model.safetensors`` (or its sharded index), else
  ``pytorch_model.bin``, else its only weight file. A pipeline root without
  weights of its own is entered through the first of ``subfolders`` present
  (e.g. ``text_encoder`` of a Flux pipeline).

  Returns:
    ``(source, config)``: config is the folder's ``config.json`` or ``{}``.
  """
  require_local(path)
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or folder")
  if not os.path.isdir(path):
    return open_file(path), {}
  folder = path
  for sub in subfolders:
    if os.path.isdir(os.path.join(path, sub)):
      folder = os.path.join(path, sub)
      break
  config = {}
  cfg_path = os.path.join(folder, "config.json")
  if os.path.isfile(cfg_path):
    try:
      with open(cfg_path) as f:
        config = json.load(f)
    except (OSError, ValueError) as e:
      raise ConversionError(
        f"{cfg_path}: unreadable config ({_first_line(e)}); re-download it"
      ) from None
  names = os.listdir(folder)
  if any(n.startswith("model") and n.endswith(".safetensors") for n in names):
    return open_folder(folder, "model"), config
  if "pytorch_model.bin" in names:
    return load_torch_file(os.path.join(folder, "pytorch_model.bin")), config
  weights = [n for n in names if n.endswith((".safetensors", *TORCH_SUFFIXES))]
  if len(weights) == 1:
    return open_file(os.path.join(folder, weights[0])), config
  if "pytorch_model.bin.index.json" in names:
    raise ConversionError(
      f"{folder}: sharded pytorch_model-*.bin checkpoints are not read; use "
      "the model's .safetensors files"
    )
  return open_folder(folder, "model"), config  # raises the precise error


def strip_prefix(source, anchors: Sequence[str]):
  """Removes a prefix shared by every key, found in front of an anchor key.

  E.g. ``text_encoders.clip_l.transformer.`` of single-file repacks: the
  first key ending in an anchor gives the candidate prefix, which is removed
  only if every key starts with it.
  """
  for anchor in anchors:
    for key in source:
      if key.endswith(anchor) and key != anchor:
        prefix = key[: -len(anchor)]
        if all(k.startswith(prefix) for k in source):
          return source.renamed(lambda k, p=prefix: k[len(p) :])
  return source


def open_transformer(path: str) -> tuple[TensorSource, dict]:
  """A diffusion transformer's tensors and its diffusers config (or {}).

  ``path``: a single ``.safetensors`` file, a diffusers ``transformer/``
  folder (sharded with its index, or one file), or a pipeline root holding
  one.
  """
  import json

  require_local(path)
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or folder")
  if not os.path.isdir(path):
    return TensorSource.from_files([path]), {}
  folder = path
  if os.path.isdir(os.path.join(path, "transformer")):
    folder = os.path.join(path, "transformer")
  config = {}
  cfg_path = os.path.join(folder, "config.json")
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      config = json.load(f)
  try:
    return open_folder(folder, "diffusion_pytorch_model"), config
  except ConversionError:
    singles = sorted(
      f for f in os.listdir(folder) if f.endswith(".safetensors")
    )
    if len(singles) != 1:
      raise
    return TensorSource.from_files([os.path.join(folder, singles[0])]), config
