"""One path layer for workdirs: local folders and object stores (``gs://``).

Every file a run writes into or reads from its workdir (``config.json``,
``metrics.jsonl``, TensorBoard events, sample grids, evaluations, exports,
the lock) goes through these functions. Local paths use ``os`` (atomic
renames, ``fsync``); URLs (``gs://bucket/run``, anything with ``://``) use
fsspec, which reaches GCS through gcsfs, the library orbax's checkpoints on
``gs://`` use too (through ``etils.epath``).

What an object store changes:

- no renames: a single object write is atomic (readers see the old or the
  new object), so single files are written in one request; a folder output
  (an evaluation, an export) is built in a local temporary folder and then
  uploaded, its marker file last (``publish_dir``);
- no appends: ``metrics.jsonl`` and the TensorBoard event file are kept on
  the host and uploaded whole at each write (``metrics.Writer``);
- a local emulator (``STORAGE_EMULATOR_HOST``, what the tests start) is used
  by gcsfs; tensorstore (orbax's array writer) is pointed at the same server
  (it also needs ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` set to any value, or it
  looks for real credentials) and gcsfs's gRPC bucket-type probe, which no
  emulator answers (it waits 60 s per bucket), is switched off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from leapalign_jax.utils import atomic_dir


def is_remote(path: str) -> bool:
  """Whether ``path`` is a URL (``gs://...``) rather than a local path."""
  return "://" in str(path)


def join(base: str, *parts: str) -> str:
  """``os.path.join`` that keeps URLs intact."""
  if is_remote(base):
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(base, *parts)


def _emulator_env() -> None:
  """Points tensorstore at ``STORAGE_EMULATOR_HOST`` too (see module doc)."""
  host = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if host and host != "default":
    if "://" not in host:
      host = f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_emulator_env()


@functools.cache
def _fs(protocol: str):
  import fsspec

  try:
    # Listings are not cached: several processes (hosts, a resumed run)
    # write the same workdir.
    return fsspec.filesystem(protocol, use_listings_cache=False)
  except ImportError as e:
    from leapalign_jax.errors import UserError

    raise UserError(
      f"{protocol}:// paths need {e.name or 'a filesystem package'} "
      "(pip install gcsfs, part of leapalign_jax's dependencies)"
    ) from None


def fs_and_path(url: str):
  """``(fsspec filesystem, path inside it)`` for a URL."""
  protocol, _, rest = url.partition("://")
  return _fs(protocol), rest


def exists(path: str) -> bool:
  """Whether a file or folder exists."""
  if not is_remote(path):
    return os.path.exists(path)
  fs, p = fs_and_path(path)
  return fs.exists(p)


def isdir(path: str) -> bool:
  """Whether ``path`` is a folder (on object stores: a prefix)."""
  if not is_remote(path):
    return os.path.isdir(path)
  fs, p = fs_and_path(path)
  return fs.isdir(p)


def makedirs(path: str) -> None:
  """Creates a folder (on object stores folders are implicit: a no-op)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names in a folder; [] when it does not exist."""
  if not is_remote(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, p = fs_and_path(path)
  if not fs.isdir(p):
    return []
  return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p))


def read_bytes(path: str) -> bytes:
  """A whole file."""
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  fs, p = fs_and_path(path)
  return fs.cat_file(p)


def read_text(path: str) -> str:
  """A whole UTF-8 file."""
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
  """Writes a file whole: readers never see a part of it."""
  if is_remote(path):
    fs, p = fs_and_path(path)
    fs.pipe_file(p, data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """``write_bytes`` of UTF-8 text."""
  write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
  """Deletes a file or a folder tree; nothing when it does not exist."""
  if not is_remote(path):
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    return
  fs, p = fs_and_path(path)
  if fs.exists(p):
    fs.rm(p, recursive=True)


def move(src: str, dst: str) -> None:
  """Renames ``src`` to ``dst`` (on object stores: copy, then delete)."""
  if not is_remote(src):
    os.replace(src, dst)
    return
  fs, p = fs_and_path(src)
  fs.mv(p, fs_and_path(dst)[1], recursive=True)


def upload(local: str, remote: str) -> None:
  """Copies a local file or folder to ``remote`` (a URL or a local path)."""
  if not is_remote(remote):
    if os.path.isdir(local):
      shutil.copytree(local, remote, dirs_exist_ok=True)
    else:
      os.makedirs(os.path.dirname(os.path.abspath(remote)), exist_ok=True)
      shutil.copyfile(local, remote)
    return
  fs, p = fs_and_path(remote)
  if os.path.isdir(local):
    for name in _files_under(local):
      fs.put_file(os.path.join(local, name), f"{p.rstrip('/')}/{name}")
  else:
    fs.put_file(local, p)


def _files_under(folder: str) -> list[str]:
  """Relative paths of the files under ``folder``, sorted."""
  out = []
  for root, _, names in os.walk(folder):
    out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
  return sorted(out)


@contextlib.contextmanager
def publish_dir(path: str, last: str | None = None) -> Iterator[str]:
  """Yields a local folder to build in; on success it becomes ``path``.

  Local ``path``: ``utils.atomic_dir(path, replace=True)`` (renamed into
  place whole). URL: the folder is built in a local temporary folder, the
  old ``path`` is deleted and the files are uploaded, ``last`` (a file name
  inside the folder, e.g. ``eval.json``) after all others, so a reader that
  finds ``last`` finds a complete folder. A kill during the upload leaves a
  partial folder without ``last``; the resumed run replaces it.
  """
  if not is_remote(path):
    with atomic_dir(path, replace=True) as tmp:
      yield tmp
    return
  tmp = tempfile.mkdtemp(prefix="leapalign-publish-")
  try:
    yield tmp
    remove(path)
    names = _files_under(tmp)
    if last in names:
      names = [n for n in names if n != last] + [last]
    fs, p = fs_and_path(path)
    for name in names:
      fs.put_file(os.path.join(tmp, name), f"{p.rstrip('/')}/{name}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def local_scratch(workdir: str, name: str) -> str:
  """A local folder standing in for ``workdir/name`` when the workdir is a URL.

  For what must be on the host's disk (a built world's memory-mapped
  models): ``$LEAPALIGN_LOCAL_DIR`` (default ``~/.cache/leapalign_jax``)
  ``/<hash of workdir>/<name>``; a local workdir gives ``workdir/name``.
  """
  if not is_remote(workdir):
    return os.path.join(workdir, name)
  root = os.environ.get("LEAPALIGN_LOCAL_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "leapalign_jax"
  )
  digest = hashlib.sha256(workdir.rstrip("/").encode()).hexdigest()[:16]
  return os.path.join(root, f"workdir-{digest}", name)
