"""Small shared helpers (files, trees)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any


@contextlib.contextmanager
def atomic_dir(path: str, replace: bool = False) -> Iterator[str]:
  """Yields a temporary sibling folder that becomes ``path`` on success.

  A build interrupted half-way (even by SIGKILL) leaves no ``path``, only a
  ``.tmp-`` folder, so "does ``path`` exist" means "is it complete".

  Args:
    path: the folder to create.
    replace: what to do when ``path`` exists by the time the build is done.
      False (builds of shared artefacts, e.g. a world): keep it and drop
      ours, since another process built the same thing and may be reading
      it. True (outputs that are rewritten, e.g. exports, by a process that
      owns them): swap ours in; the old folder is renamed aside first and
      deleted after, so ``path`` is never a mix of both. Leftovers of killed
      builds of ``path`` are deleted first.
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  name = os.path.basename(path)
  if replace:  # we own ``path``: drop what killed builds left behind
    for stale in os.listdir(parent):
      if stale.startswith((f".tmp-{name}-", f".old-{name}-")):
        shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
  old = None
  try:
    yield tmp
    if os.path.exists(path) and replace:
      old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
      os.replace(path, os.path.join(old, "x"))
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.isdir(path):
        raise  # a real failure, not "someone else finished first"
  finally:
    for leftover in (tmp, old):
      if leftover and os.path.exists(leftover):
        shutil.rmtree(leftover, ignore_errors=True)


def flatten_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts as one level, ``{"a.b": leaf}`` (configs as JSON)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
