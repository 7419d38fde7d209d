"""Small shared helpers (files, trees)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
  """Yields a temporary sibling folder that becomes ``path`` on success.

  A build interrupted half-way leaves no ``path`` (only a ``.tmp-`` folder,
  removed on failure), so "does ``path`` exist" means "is it complete".
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
  try:
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def count_params(tree) -> int:
  """Number of scalars in a pytree."""
  return sum(x.size for x in jax.tree.leaves(tree))
