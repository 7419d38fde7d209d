"""Weights and prompt caches from a bucket, copied once to each host's disk.

  python -m leapalign_jax.staging --config configs/<run>.py:flux=gs://b/FLUX.1-dev,...
  python -m leapalign_jax.staging --src gs://b/hps_v2.1.safetensors [--src ...]
  python -m leapalign_jax.staging --push /local/folder gs://b/folder

The loaders memory-map local files, so a config may name ``gs://`` sources
only through this step: every ``://`` string in the config is a source;
``stage`` copies each to ``$LEAPALIGN_STAGE_DIR`` (default
``~/leapalign_stage``) ``/<scheme>/<bucket>/<path>`` and writes a marker,
``<that path>.staged.json`` (the files and their sizes), when the copy is
complete. ``resolve_config`` (called by training, evaluation, sampling and
``embed_prompts``) then reads each ``gs://`` path from its staged copy, and
refuses a source not staged on this host with one line naming this
command. ``launch/tpu.sh stage`` runs it on every worker of a slice.

Resumable and done once: files are copied to ``<name>.partial`` and renamed
when whole; a rerun skips files already here at the source's size, and a
source whose listing matches its marker is not copied again. ``--push``
uploads a folder made on one host (an ``embed_prompts`` cache) for the
others to stage, its ``manifest.json`` last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import ml_collections

from leapalign_jax import errors, fileio

MARKER = ".staged.json"
COMMAND = errors.STAGING_COMMAND


def stage_root() -> str:
  """Where staged copies live on this host."""
  return os.environ.get("LEAPALIGN_STAGE_DIR") or os.path.join(
    os.path.expanduser("~"), "leapalign_stage"
  )


def local_path(url: str) -> str:
  """The local copy's path of ``url`` (whether staged or not)."""
  scheme, _, rest = url.partition("://")
  return os.path.join(stage_root(), scheme, *rest.strip("/").split("/"))


def _marker(url: str) -> str:
  return local_path(url) + MARKER


def staged_copy(url: str) -> str | None:
  """The local copy of ``url`` if it, or a folder above it, is staged."""
  scheme, _, rest = url.partition("://")
  parts = rest.strip("/").split("/")
  for n in range(len(parts), 0, -1):
    if os.path.isfile(_marker(f"{scheme}://{'/'.join(parts[:n])}")):
      return local_path(url)
  return None


def resolve(url: str, what: str = "") -> str:
  """``url``'s staged local copy; a local path is returned unchanged.

  Raises:
    UserError: ``url`` is not staged on this host.
  """
  if not fileio.is_remote(url):
    return url
  local = staged_copy(url)
  if local is None:
    raise errors.UserError(errors.not_staged_message(url, what))
  return local


def _string_fields(
  config: ml_collections.ConfigDict, prefix: str = ""
) -> list[tuple[str, str]]:
  out = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out += _string_fields(value, name + ".")
    elif isinstance(value, str):
      out.append((name, value))
  return out


def config_sources(config: ml_collections.ConfigDict) -> list[str]:
  """The ``://`` paths a config names, minus those inside another one."""
  urls = sorted(
    {v.rstrip("/") for _, v in _string_fields(config) if "://" in v}
  )
  return [
    u for u in urls if not any(u.startswith(o + "/") for o in urls if o != u)
  ]


def resolve_config(
  config: ml_collections.ConfigDict, sections: tuple[str, ...] = ()
) -> ml_collections.ConfigDict:
  """A copy of ``config`` reading every ``://`` path from its staged copy.

  Args:
    config: a run's config.
    sections: only these top-level sections (e.g. ``("text",)`` for
      ``embed_prompts``, which runs before the caches it makes exist);
      all when empty.

  Raises:
    UserError: a source is not staged on this host (one line).
  """
  fields = [
    (k, v)
    for k, v in _string_fields(config)
    if "://" in v and (not sections or k.split(".")[0] in sections)
  ]
  if not fields:
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  for key, url in fields:
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = resolve(url, f"config.{key}")
  c.lock()
  return c


def _listing(url: str) -> dict[str, int]:
  """``{relative name: size}`` of a URL's files ("" for a single file)."""
  fs, path = fileio.fs_and_path(url)
  if not fs.exists(path):
    raise errors.UserError(f"{url}: no such file or folder in the bucket")
  if not fs.isdir(path):
    return {"": int(fs.info(path)["size"])}
  root = path.rstrip("/") + "/"
  found = fs.find(path, detail=True)
  return {
    name[len(root) :]: int(info["size"])
    for name, info in found.items()
    if info.get("type") != "directory" and name.startswith(root)
  }


def stage(url: str, log: Callable[[str], None] = print) -> str:
  """Copies ``url`` (a file or folder tree) to ``local_path(url)``, once.

  Returns:
    The local path.
  """
  local = local_path(url.rstrip("/"))
  marker = local + MARKER
  files = _listing(url)

  def here(name: str, size: int) -> bool:
    dst = os.path.join(local, name) if name else local
    return os.path.isfile(dst) and os.path.getsize(dst) == size

  if os.path.isfile(marker):
    with open(marker) as f:
      same = json.load(f).get("files") == files
    if same and all(here(n, s) for n, s in files.items()):
      log(f"{url}: already staged at {local}")
      return local
    os.remove(marker)  # changed or damaged: incomplete until recopied
  fs, path = fileio.fs_and_path(url)
  copied = 0
  for name, size in sorted(files.items()):
    if here(name, size):
      continue
    dst = os.path.join(local, name) if name else local
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    src = f"{path.rstrip('/')}/{name}" if name else path
    fs.get_file(src, dst + ".partial")
    if os.path.getsize(dst + ".partial") != size:
      raise OSError(f"{url}/{name}: copied size differs from the bucket's")
    os.replace(dst + ".partial", dst)
    copied += 1
  fileio.write_text(marker, json.dumps({"source": url, "files": files}))
  total = sum(files.values())
  log(
    f"{url}: staged at {local} ({len(files)} files, {total / 1e9:.2f} GB; "
    f"{copied} copied, {len(files) - copied} already here)"
  )
  return local


def push(local: str, url: str, log: Callable[[str], None] = print) -> None:
  """Uploads ``local`` to ``url``; this host then counts it as staged.

  ``manifest.json`` (a prompt cache's) goes last, so a reader that finds it
  finds every shard it lists.
  """
  if os.path.isdir(local):
    names = sorted(
      os.path.relpath(os.path.join(r, n), local)
      for r, _, ns in os.walk(local)
      for n in ns
      if not n.endswith((MARKER, ".partial"))
    )
    names = [n for n in names if n != "manifest.json"] + [
      n for n in names if n == "manifest.json"
    ]
    for name in names:
      fileio.upload(os.path.join(local, name), fileio.join(url, name))
  else:
    fileio.upload(local, url)
  if os.path.abspath(local) == os.path.abspath(local_path(url)):
    files = _listing(url)
    fileio.write_text(
      local_path(url) + MARKER, json.dumps({"source": url, "files": files})
    )
  log(f"{local}: uploaded to {url}")
