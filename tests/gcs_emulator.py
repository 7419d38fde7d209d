"""A local GCS emulator for tests: ``gcp-storage-emulator`` on a free port.

``running(tmp)`` starts it (in memory, one bucket), waits until it answers
and stops it afterwards. Run as a script, this file starts the emulator
with one gap closed: its downloads lack the ``x-goog-generation`` header
that real GCS sends and that tensorstore (orbax's array writer) reads when
it updates an OCDBT manifest ("Malformed StorageGeneration" otherwise). ``env(host)`` is what a subprocess needs to use it:
``STORAGE_EMULATOR_HOST`` (gcsfs; ``leapalign_jax.fileio`` points
tensorstore, orbax's array writer, at the same server) and a fixed OAuth
token for tensorstore, which otherwise looks for real credentials. The test
process itself talks to the emulator through its JSON API with urllib only,
so its own gcsfs (imported by others tests, maybe already) is never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BUCKET = "leapalign-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(log_path: str) -> Iterator[str]:
  """Yields the emulator's ``http://127.0.0.1:<port>``; stops it after."""
  port = _free_port()
  host = f"http://127.0.0.1:{port}"
  cmd = [sys.executable, __file__, "start"]
  cmd += ["--port", str(port), "-H", "127.0.0.1", "-M", "-q"]
  cmd += ["--default-bucket", BUCKET]
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        list_objects(host, "")
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(
            f"the GCS emulator did not start: {Path(log_path).read_text()}"
          ) from None
        time.sleep(0.1)
    yield host
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def env(host: str) -> dict[str, str]:
  """Environment variables that send a subprocess's gs:// I/O to ``host``."""
  return {
    "STORAGE_EMULATOR_HOST": host,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
  }


def list_objects(host: str, prefix: str) -> list[str]:
  """Names of the objects under ``prefix`` in the test bucket."""
  names, token = [], ""
  while True:
    query = {"prefix": prefix}
    if token:
      query["pageToken"] = token
    url = f"{host}/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as r:
      page = json.load(r)
    names += [item["name"] for item in page.get("items", [])]
    token = page.get("nextPageToken", "")
    if not token:
      return names


def read_object(host: str, name: str) -> bytes:
  """One object's bytes."""
  quoted = urllib.parse.quote(name, safe="")
  url = f"{host}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media"
  with urllib.request.urlopen(url, timeout=30) as r:
    return r.read()


def upload_object(host: str, name: str, data: bytes) -> None:
  """Writes one object."""
  query = urllib.parse.urlencode({"uploadType": "media", "name": name})
  url = f"{host}/upload/storage/v1/b/{BUCKET}/o?{query}"
  request = urllib.request.Request(url, data=data, method="POST")
  request.add_header("Content-Type", "application/octet-stream")
  with urllib.request.urlopen(request, timeout=30):
    pass


def download_tree(host: str, prefix: str, dest: str) -> None:
  """Copies every object under ``prefix`` to ``dest`` (same relative names)."""
  root = prefix.rstrip("/") + "/"
  for name in list_objects(host, root):
    path = os.path.join(dest, name[len(root) :])
    if name.endswith("/"):  # a folder placeholder
      os.makedirs(path, exist_ok=True)
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(read_object(host, name))


def _serve() -> None:
  """``python -m gcp_storage_emulator`` with generation headers on downloads."""
  from gcp_storage_emulator.handlers import objects

  plain = objects.download

  def download(request, response, storage, *args, **kwargs):
    plain(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      obj = storage.get_file_obj(
        request.params["bucket_name"], request.params["object_id"]
      )
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  # Before the server module builds its route table from it.
  objects.download = download
  from gcp_storage_emulator import __main__ as emulator_main

  sys.exit(emulator_main.main(sys.argv[1:]))


if __name__ == "__main__":
  _serve()
