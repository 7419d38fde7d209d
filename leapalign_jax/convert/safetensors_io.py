"""safetensors without torch: validated headers, memory-mapped reads, atomic writes.

bf16 (and fp8) tensors map to ``ml_dtypes`` so they are read zero-copy with
numpy; nothing is loaded until a tensor is indexed, and a tensor is read at
most once by the converters (a slice of the memory map per layer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from leapalign_jax.convert.errors import ConversionError, name_some
from leapalign_jax.errors import require_local

DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives in a file."""

  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute byte offset in the file
  end: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Reads and validates a safetensors header.

  Raises:
    ConversionError: if the file is missing, truncated or not safetensors.
    UserError: ``path`` is a URL (stage it first).
  """
  require_local(path)
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(
        f"{path}: {size} bytes is too short for a safetensors file "
        "(truncated download?); re-download or re-export it"
      )
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
      raise ConversionError(
        f"{path}: not a valid safetensors file (header length {n} does not "
        f"fit in {size} bytes); the file is corrupt or truncated, re-download it"
      )
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(
      f"{path}: corrupt safetensors header ({e.__class__.__name__}); "
      "re-download or re-export the file"
    ) from None
  if not isinstance(header, dict):
    raise ConversionError(f"{path}: corrupt safetensors header (not a dict)")
  metadata = header.pop("__metadata__", None) or {}
  data_start = 8 + n
  infos = {}
  for name, entry in header.items():
    try:
      code, shape, (lo, hi) = (
        entry["dtype"],
        entry["shape"],
        entry["data_offsets"],
      )
    except (KeyError, TypeError, ValueError):
      raise ConversionError(
        f"{path}: corrupt safetensors header entry for {name!r}"
      ) from None
    if code not in DTYPES:
      raise ConversionError(
        f"{path}: tensor {name!r} has dtype {code}, which is not supported "
        f"(supported: {', '.join(DTYPES)}); quantised checkpoints (FP8 "
        "scales, NF4, GGUF) must be dequantised first"
      )
    dtype = DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize
    if hi - lo != nbytes or lo < 0:
      raise ConversionError(
        f"{path}: tensor {name!r} spans {hi - lo} bytes but {code}{shape} "
        f"needs {nbytes}; the file is corrupt"
      )
    if data_start + hi > size:
      raise ConversionError(
        f"{path}: truncated (tensor {name!r} ends at byte {data_start + hi} "
        f"but the file has {size}); re-download it"
      )
    infos[name] = TensorInfo(
      path, dtype, tuple(shape), data_start + lo, data_start + hi
    )
  return infos, metadata


class TensorSource(Mapping[str, np.ndarray]):
  """Read-only mapping ``name -> np.ndarray`` over one or more files.

  Arrays are zero-copy views of per-file memory maps; indexing a view reads
  only the bytes it touches.
  """

  def __init__(self, infos: dict[str, TensorInfo], description: str):
    self.infos = infos
    self.description = description
    self._maps: dict[str, np.memmap] = {}

  @classmethod
  def from_files(cls, paths: Iterable[str], description: str | None = None):
    paths = list(paths)
    infos: dict[str, TensorInfo] = {}
    for p in paths:
      file_infos, _ = read_header(p)
      dup = infos.keys() & file_infos.keys()
      if dup:
        raise ConversionError(
          f"{p}: tensors {name_some(dup)} also appear in another shard; the "
          "folder mixes two checkpoints"
        )
      infos.update(file_infos)
    return cls(infos, description or ", ".join(paths))

  def _map(self, path: str) -> np.memmap:
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    return self._maps[path]

  def __getitem__(self, name: str) -> np.ndarray:
    info = self.infos[name]
    raw = self._map(info.path)[info.start : info.end]
    return raw.view(info.dtype).reshape(info.shape)

  def __iter__(self):
    return iter(self.infos)

  def __len__(self):
    return len(self.infos)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.infos[name].shape

  def renamed(self, fn: Callable[[str], str | None]) -> TensorSource:
    """A view with every key passed through ``fn`` (e.g. strip a prefix).

    Keys that ``fn`` maps to None are left out of the view.
    """
    renamed = ((fn(k), v) for k, v in self.infos.items())
    out = TensorSource(
      {k: v for k, v in renamed if k is not None}, self.description
    )
    out._maps = self._maps
    return out


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor to be produced when written: ``fn()`` must return ``shape``."""

  shape: tuple[int, ...]
  dtype: np.dtype
  fn: Callable[[], np.ndarray]


def _describe(arr) -> tuple[tuple[int, ...], np.dtype]:
  if isinstance(arr, LazyTensor):
    return tuple(arr.shape), np.dtype(arr.dtype)
  return tuple(arr.shape), np.dtype(arr.dtype)


def save_file(
  tensors: Mapping[str, Any], path: str, metadata: dict[str, str] | None = None
) -> None:
  """Writes a safetensors file atomically (temporary name, fsync, rename).

  Values are arrays (numpy, or anything ``np.asarray`` accepts) or
  ``LazyTensor`` s, produced one at a time so that a model is never held
  twice in host memory. Tensors are written in sorted key order.
  """
  names = sorted(tensors)
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  for name in names:
    shape, dtype = _describe(tensors[name])
    if dtype not in _CODES:
      raise ConversionError(f"cannot write {name!r}: unsupported dtype {dtype}")
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {
      "dtype": _CODES[dtype],
      "shape": list(shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    prefix=".tmp-", suffix=".safetensors", dir=directory
  )
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(struct.pack("<Q", len(raw)))
      f.write(raw)
      for name in names:
        value = tensors[name]
        shape, dtype = _describe(value)
        arr = value.fn() if isinstance(value, LazyTensor) else value
        # asarray(order="C"), unlike ascontiguousarray, keeps 0-d scalars.
        arr = np.asarray(arr, order="C")
        if arr.shape != shape or arr.dtype != dtype:
          raise ConversionError(
            f"cannot write {name!r}: produced {arr.dtype}{arr.shape}, "
            f"declared {dtype}{shape}"
          )
        f.write(arr.tobytes())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_sharded(
  tensors: Mapping[str, Any],
  folder: str,
  prefix: str = "diffusion_pytorch_model",
  max_shard_bytes: int = 10 * 1024**3,
  metadata: dict[str, str] | None = None,
) -> list[str]:
  """Writes diffusers/transformers-style shards plus an index json.

  A model that fits in one shard is written as ``{prefix}.safetensors`` with
  no index (what ``save_pretrained`` does). Returns the written file names.
  """
  names = sorted(tensors)
  shards: list[list[str]] = [[]]
  size = 0
  total = 0
  for name in names:
    shape, dtype = _describe(tensors[name])
    nbytes = math.prod(shape) * dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
    total += nbytes
  os.makedirs(folder, exist_ok=True)
  if len(shards) == 1:
    fname = f"{prefix}.safetensors"
    save_file(tensors, os.path.join(folder, fname), metadata)
    return [fname]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(
      {n: tensors[n] for n in shard}, os.path.join(folder, fname), metadata
    )
    files.append(fname)
    weight_map.update(dict.fromkeys(shard, fname))
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  write_json_atomic(
    os.path.join(folder, f"{prefix}.safetensors.index.json"), index
  )
  return files


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON via a temporary file and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def open_folder(folder: str, prefix: str) -> TensorSource:
  """Opens a diffusers/transformers weight folder (single file or sharded).

  Raises:
    ConversionError: if the folder holds no weights, shards without their
      index, or an index that names missing files.
  """
  single = os.path.join(folder, f"{prefix}.safetensors")
  index = os.path.join(folder, f"{prefix}.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConversionError(
        f"{index}: unreadable index ({e.__class__.__name__}); re-download it"
      ) from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
      raise ConversionError(
        f"{folder}: the index names shards that are missing: "
        f"{name_some(missing)}; download every shard listed in {index}"
      )
    source = TensorSource.from_files(
      [os.path.join(folder, f) for f in files], description=folder
    )
    listed = set(weight_map)
    if listed != set(source.infos):
      diff = listed ^ set(source.infos)
      raise ConversionError(
        f"{folder}: the index and the shards disagree on {name_some(diff)}; "
        "the folder mixes two checkpoints, re-download it"
      )
    return source
  if os.path.isfile(single):
    return TensorSource.from_files([single], description=folder)
  shards = sorted(
    f
    for f in os.listdir(folder)
    if f.startswith(f"{prefix}-") and f.endswith(".safetensors")
  )
  if shards:
    raise ConversionError(
      f"{folder}: has {len(shards)} weight shards ({shards[0]}, …) but no "
      f"index {os.path.basename(index)}; download the index json too"
    )
  raise ConversionError(
    f"{folder}: no {prefix}.safetensors and no {os.path.basename(index)}; "
    "this is not a diffusers/transformers weight folder"
  )
