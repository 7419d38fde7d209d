"""Declarative key tables shared by every converter, used in both directions.

A ``Rule`` says how one parameter of ours (one layer of it, for stacked
blocks) is built from slices of one or more source tensors: the slices are
concatenated along their axis and passed through a ``Transform``. Export runs
the same rules backwards, so a load followed by an export reproduces the source
tensors exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from leapalign_jax.convert.errors import ConversionError, name_some
from leapalign_jax.convert.safetensors_io import LazyTensor

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Src:
  """A slice ``[start:stop]`` along ``axis`` of source tensor ``key``."""

  key: str
  shape: tuple[int, ...]  # the full shape of the source tensor
  axis: int = 0
  start: int = 0
  stop: int | None = None

  @property
  def size(self) -> int:
    stop = self.shape[self.axis] if self.stop is None else self.stop
    return stop - self.start

  def index(self) -> tuple[slice, ...]:
    if not self.shape:  # a scalar (e.g. CLIP's logit_scale): no axis to slice
      return ()
    idx = [slice(None)] * len(self.shape)
    idx[self.axis] = slice(self.start, self.stop)
    return tuple(idx)


@dataclasses.dataclass(frozen=True)
class Transform:
  """A pair of exact inverse maps: source layout <-> our layout."""

  fwd: Callable[[np.ndarray], np.ndarray]
  inv: Callable[[np.ndarray], np.ndarray]
  name: str = ""


def _tuple(shape) -> tuple[int, ...]:
  return (shape,) if isinstance(shape, int) else tuple(shape)


def identity() -> Transform:
  """The source tensor as is (norm scales, plain biases)."""
  return Transform(lambda a: a, lambda a: a, "identity")


def reshape(
  shape: int | Sequence[int], src_shape: int | Sequence[int]
) -> Transform:
  """Pure reshapes (biases of structured outputs, squeezed 1×1 kernels)."""
  shape, src_shape = _tuple(shape), _tuple(src_shape)
  return Transform(
    lambda a: a.reshape(shape), lambda a: a.reshape(src_shape), "reshape"
  )


def linear(
  in_shape: int | Sequence[int], out_shape: int | Sequence[int]
) -> Transform:
  """Torch ``[out, in]`` weight <-> our ``[*in_shape, *out_shape]`` kernel."""
  in_shape, out_shape = _tuple(in_shape), _tuple(out_shape)
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return Transform(
    lambda w: w.T.reshape(in_shape + out_shape),
    lambda k: k.reshape(n_in, n_out).T,
    "linear",
  )


def conv2d() -> Transform:
  """Torch ``[out, in, kh, kw]`` <-> our ``[kh, kw, in, out]``."""
  return Transform(
    lambda w: w.transpose(2, 3, 1, 0),
    lambda k: k.transpose(3, 2, 0, 1),
    "conv2d",
  )


def chain(*transforms: Transform) -> Transform:
  """Applies ``transforms`` in order on load (and inverted in reverse)."""

  def fwd(a):
    for t in transforms:
      a = t.fwd(a)
    return a

  def inv(a):
    for t in reversed(transforms):
      a = t.inv(a)
    return a

  return Transform(fwd, inv, "+".join(t.name for t in transforms))


def swap_halves(then: Transform) -> Transform:
  """Swaps the two halves of axis 0 before ``then`` (self-inverse swap)."""

  def swap(a):
    h = a.shape[0] // 2
    return np.concatenate([a[h:], a[:h]], axis=0)

  return Transform(
    lambda a: then.fwd(swap(a)),
    lambda a: swap(then.inv(a)),
    f"swap+{then.name}",
  )


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our ``target`` (at ``layer`` of a stacked axis) from concatenated srcs."""

  target: Path
  layer: int | None
  srcs: tuple[Src, ...]
  transform: Transform

  def gather(self, source: Mapping[str, np.ndarray]) -> np.ndarray:
    parts = [np.asarray(source[s.key][s.index()]) for s in self.srcs]
    arr = (
      parts[0] if len(parts) == 1 else np.concatenate(parts, self.srcs[0].axis)
    )
    return self.transform.fwd(arr)


class Table:
  """Collects rules; ``lin`` adds the common torch ``nn.Linear`` case."""

  def __init__(self):
    self.rules: list[Rule] = []

  def add(self, target, layer, srcs, transform):
    self.rules.append(Rule(tuple(target), layer, tuple(srcs), transform))

  def lin(
    self,
    target,
    layer,
    key,
    in_shape,
    out_shape,
    *,
    bias=True,
    parts=None,
    src_shape=None,
  ):
    """A linear layer: ``key.weight`` (rows from ``parts``) -> kernel+bias."""
    n_in = math.prod(_tuple(in_shape))
    n_out = math.prod(_tuple(out_shape))
    parts = parts or [(key, None, None)]
    w_srcs, b_srcs = [], []
    for k, lo, hi in parts:
      full_out = src_shape[0] if src_shape else n_out
      w_srcs.append(Src(f"{k}.weight", (full_out, n_in), 0, lo or 0, hi))
      b_srcs.append(Src(f"{k}.bias", (full_out,), 0, lo or 0, hi))
    self.add((*target, "kernel"), layer, w_srcs, linear(in_shape, out_shape))
    if bias:
      self.add((*target, "bias"), layer, b_srcs, reshape(out_shape, (n_out,)))


def expected_sources(rules: Sequence[Rule]) -> dict[str, tuple[int, ...]]:
  """Every source key the rules read, with its full shape."""
  shapes: dict[str, tuple[int, ...]] = {}
  for rule in rules:
    for s in rule.srcs:
      if shapes.setdefault(s.key, s.shape) != s.shape:
        raise AssertionError(f"inconsistent shapes for {s.key} in the rules")
  return shapes


def validate(rules: Sequence[Rule], source, what: str, fix: str = "") -> None:
  """Raises one ``ConversionError`` listing missing/unexpected/mis-shaped keys."""
  expected = expected_sources(rules)
  present = set(source.keys())
  missing = expected.keys() - present
  unexpected = present - expected.keys()
  wrong = [
    k
    for k in expected.keys() & present
    if tuple(source.shape(k)) != tuple(expected[k])
  ]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing ({name_some(missing)})")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected ({name_some(unexpected)})")
  if wrong:
    shown = "; ".join(
      f"{k}: file {tuple(source.shape(k))} vs model {tuple(expected[k])}"
      for k in sorted(wrong)[:5]
    )
    more = f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""
    problems.append(f"{len(wrong)} with the wrong shape ({shown}{more})")
  if problems:
    raise ConversionError(
      f"{source.description}: {what} does not match the model: "
      + "; ".join(problems)
      + (f". {fix}" if fix else "")
    )


def _group(rules: Sequence[Rule]) -> dict[Path, dict[int | None, Rule]]:
  by_target: dict[Path, dict[int | None, Rule]] = defaultdict(dict)
  for rule in rules:
    by_target[rule.target][rule.layer] = rule
  return by_target


def load(
  rules: Sequence[Rule],
  source,
  abstract: Mapping[Path, Any],
  dtype: Any,
  shardings: Mapping[Path, jax.sharding.Sharding] | None = None,
) -> dict[Path, jax.Array]:
  """Builds our flat parameter dict from ``source`` following ``rules``.

  ``abstract`` maps our paths to shapes (``ShapeDtypeStruct`` s). With
  ``shardings``, every array is created with ``make_array_from_callback`` so
  each device shard is filled from the memory map directly, one layer at a
  time; the whole tensor is never materialised on one host.
  """
  by_target = _group(rules)
  missing = set(abstract) - set(by_target)
  extra = set(by_target) - set(abstract)
  if missing or extra:  # a bug in the tables, not in the user's file
    raise AssertionError(
      f"key table out of sync with the model: missing {sorted(missing)[:5]}, "
      f"extra {sorted(extra)[:5]}"
    )
  np_dtype = np.dtype(jnp.dtype(dtype))
  out = {}
  for path, spec in abstract.items():
    shape = tuple(spec.shape)
    layers = by_target[path]
    stacked = None not in layers
    if stacked and sorted(layers) != list(range(shape[0])):
      raise AssertionError(f"{path}: rules cover layers {sorted(layers)}")

    def value(index, layers=layers, stacked=stacked, shape=shape, path=path):
      if not stacked:
        arr = layers[None].gather(source)
        _check(arr, shape, path)
        return arr[index].astype(np_dtype)
      rows = range(shape[0])[index[0]]
      parts = []
      for i in rows:
        arr = layers[i].gather(source)
        _check(arr, shape[1:], path)
        parts.append(arr[index[1:]].astype(np_dtype))
      return np.stack(parts) if parts else np.zeros((0,) + shape[1:], np_dtype)

    full = tuple(slice(None) for _ in shape)
    if shardings is not None:
      out[path] = jax.make_array_from_callback(shape, shardings[path], value)
    else:
      out[path] = jnp.asarray(value(full))
  return out


def _check(arr, shape, path):
  if tuple(arr.shape) != tuple(shape):
    raise AssertionError(
      f"{path}: rule produced {arr.shape}, model has {shape}"
    )


def export(
  rules: Sequence[Rule], params: Mapping[Path, Any], dtype: Any | None = None
) -> dict[str, LazyTensor]:
  """Source-layout tensors (lazy, one at a time) from our flat parameters.

  ``dtype=None`` keeps each parameter's own dtype.
  """
  by_key: dict[str, list[tuple[Rule, int]]] = defaultdict(list)
  for rule in rules:
    for i, s in enumerate(rule.srcs):
      by_key[s.key].append((rule, i))
  out = {}
  for key, users in by_key.items():
    src0 = users[0][0].srcs[users[0][1]]
    rule0 = users[0][0]
    pdtype = np.dtype(params[rule0.target].dtype) if dtype is None else None
    np_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else pdtype

    def produce(users=users, shape=src0.shape, np_dtype=np_dtype):
      buf = np.empty(shape, np_dtype)
      for rule, i in users:
        param = params[rule.target]
        value = param if rule.layer is None else param[rule.layer]
        full = rule.transform.inv(np.asarray(value))
        if len(rule.srcs) == 1:
          piece = full
        else:
          sizes = np.cumsum([s.size for s in rule.srcs])[:-1]
          piece = np.split(full, sizes, axis=rule.srcs[i].axis)[i]
        buf[rule.srcs[i].index()] = piece.astype(np_dtype)
      return buf

    out[key] = LazyTensor(src0.shape, np_dtype, produce)
  return out


class _LazyParam:
  """One of our parameters, computed from the source only when indexed."""

  def __init__(self, layers: dict[int | None, Rule], source, dtype):
    self.layers, self.source, self.dtype = layers, source, np.dtype(dtype)

  def __getitem__(self, layer: int) -> np.ndarray:
    return self.layers[layer].gather(self.source).astype(self.dtype)

  def __array__(self, dtype=None, copy=None):
    del copy
    arr = self.layers[None].gather(self.source).astype(self.dtype)
    return arr if dtype is None else arr.astype(dtype)


def lazy_params(rules: Sequence[Rule], source, dtype) -> dict[Path, _LazyParam]:
  """Our parameters as lazy views of ``source``, for streaming conversion.

  ``export(other_rules, lazy_params(rules, source, dtype))`` converts between
  two checkpoint layouts holding one tensor in memory at a time.
  """
  return {
    path: _LazyParam(layers, source, dtype)
    for path, layers in _group(rules).items()
  }
