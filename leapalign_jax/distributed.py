"""Multi-process JAX: when to call ``jax.distributed.initialize``, and how.

Used by ``main`` (training) and ``embed_prompts`` (which runs on every
worker of a TPU slice, since a slice's chips start together). Once the
runtime is up, ``main`` also starts the ``Watchdog`` (a lost process stops
the others within ``$LEAPALIGN_HEARTBEAT_TIMEOUT_S``, with one line naming
it) and ``check_same_start`` (every process runs process 0's config and
code), and ``barrier`` lets process 0 build what the others then read.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from leapalign_jax import errors, utils

# A process silent this long counts as lost (``Watchdog``); JAX's own
# heartbeat timeout is set to twice as much, as a backstop.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60.0
_KV = "leapalign"

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (jax._src.hardware_utils)


def _tpu_vm() -> bool:
  """True on a Cloud TPU VM (TPU chips on the PCI bus, as JAX checks)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def distributed_kwargs(
  env: Mapping[str, str], on_tpu_vm: bool = False
) -> dict[str, Any] | None:
  """Arguments for ``jax.distributed.initialize``, or None (one process).

  - ``LEAPALIGN_DISTRIBUTED=0|1`` forces the decision (auto-detection).
  - ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``
    (what ``launch/slurm.sbatch`` exports: one process per node driving all
    its GPUs) are passed explicitly with cluster detection off. JAX does not
    read the last two itself, and its SLURM auto-detection would give each
    process only GPU ``SLURM_LOCALID`` (its one-process-per-GPU layout).
  - Otherwise JAX auto-detects: a coordinator address alone, a multi-task
    SLURM step (one process per GPU), GKE / multi-slice TPU environment
    variables, and every Cloud TPU VM (``launch/tpu.sh`` sets nothing; JAX
    reads the worker list from the metadata server, and one host is a
    one-process job).
  """
  forced = env.get("LEAPALIGN_DISTRIBUTED", "")
  if forced == "0":
    return None
  coordinator = env.get("JAX_COORDINATOR_ADDRESS", "")
  num, pid = env.get("JAX_NUM_PROCESSES", ""), env.get("JAX_PROCESS_ID", "")
  if coordinator and num and pid:
    if int(num) <= 1 and forced != "1":
      return None
    return {
      "coordinator_address": coordinator,
      "num_processes": int(num),
      "process_id": int(pid),
      "cluster_detection_method": "deactivate",
    }
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  if (
    forced == "1"
    or coordinator
    or int(env.get("SLURM_NTASKS", "1")) > 1
    or len([h for h in (hosts or "").split(",") if h]) > 1
    or int(env.get("MEGASCALE_NUM_SLICES", "1")) > 1
    or on_tpu_vm
  ):
    return {}
  return None


def initialize() -> bool:
  """``jax.distributed.initialize`` when needed; True when it ran.

  JAX's preemption service installs its own SIGTERM handler there, which
  only records the notice for ``multihost_utils.reached_preemption_sync_point``
  (not used here): a SIGTERM from then until the caller's handler is back
  would be swallowed and the program would go on. The handler that was
  installed before is restored at once; callers with none install theirs
  right after.
  """
  import jax

  kwargs = distributed_kwargs(os.environ, _tpu_vm())
  if kwargs is None:
    return False
  before = signal.getsignal(signal.SIGTERM)
  if kwargs.get("num_processes", 2) > 1:
    kwargs["heartbeat_timeout_seconds"] = int(2 * heartbeat_timeout() + 1)
  jax.distributed.initialize(**kwargs)
  if before is not None:
    signal.signal(signal.SIGTERM, before)
  return True


def heartbeat_timeout() -> float:
  """``$LEAPALIGN_HEARTBEAT_TIMEOUT_S`` (seconds), or the default."""
  value = os.environ.get("LEAPALIGN_HEARTBEAT_TIMEOUT_S", "")
  try:
    out = float(value) if value else DEFAULT_HEARTBEAT_TIMEOUT_S
  except ValueError:
    out = -1.0
  if out <= 0:
    raise errors.UserError(
      f"LEAPALIGN_HEARTBEAT_TIMEOUT_S={value!r}: give a positive number of "
      "seconds"
    )
  return out


def _client():
  """The coordination service client of ``jax.distributed`` (or None)."""
  from jax._src import distributed as jax_distributed

  return jax_distributed.global_state.client


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process reaches ``barrier(name)`` (no-op alone).

  Through the coordination service, not a device collective: process 0
  may spend minutes building a world while the others wait here. Each
  call is a new barrier (a barrier id serves once), numbered per name.
  """
  import jax

  if jax.process_count() > 1:
    n = _BARRIERS[name] = _BARRIERS.get(name, 0) + 1
    _client().wait_at_barrier(f"{_KV}/{name}/{n}", int(timeout_s * 1000))


_BARRIERS: dict[str, int] = {}


def code_version() -> str:
  """A hash of the package's source: processes must run the same code."""
  root = Path(__file__).resolve().parent
  h = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    h.update(str(path.relative_to(root)).encode())
    h.update(path.read_bytes())
  return h.hexdigest()[:16]


def _differences(mine: dict, theirs: dict) -> list[str]:
  keys = sorted(set(mine) | set(theirs))
  return [
    f"{k}: {theirs.get(k)!r} on process 0, {mine.get(k)!r} here"
    for k in keys
    if mine.get(k) != theirs.get(k)
  ]


def check_same_start(config_json: str, timeout_s: float = 600.0) -> None:
  """Refuses a start where a process has another config or code version.

  Process 0 publishes its config and code hash; every other process
  compares and publishes its verdict; each one that differs (and process
  0, for all of them) stops with a one-line ``UserError``.
  """
  import jax

  if jax.process_count() <= 1:
    return
  client, me = _client(), jax.process_index()
  flat = {
    k: json.dumps(v, sort_keys=True)
    for k, v in utils.flatten_dict(json.loads(config_json)).items()
  }
  mine = {"code": code_version(), "config": flat}
  ms = int(timeout_s * 1000)
  if me == 0:
    client.key_value_set(f"{_KV}/start/0", json.dumps(mine))
    verdicts = [
      client.blocking_key_value_get(f"{_KV}/verdict/{i}", ms)
      for i in range(1, jax.process_count())
    ]
    bad = [v for v in verdicts if v]
    if bad:
      raise errors.UserError(
        f"{bad[0]}; start every process with the same command and the same "
        "checkout" + (f" ({len(bad)} processes differ)" if len(bad) > 1 else "")
      )
    return
  theirs = json.loads(client.blocking_key_value_get(f"{_KV}/start/0", ms))
  problem = ""
  if theirs["code"] != mine["code"]:
    problem = (
      f"process {me} runs another version of leapalign_jax than process 0 "
      f"(source hash {mine['code']} here, {theirs['code']} there)"
    )
  else:
    diff = _differences(mine["config"], theirs["config"])
    if diff:
      problem = (
        f"process {me} was started with another config than process 0 "
        f"({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''})"
      )
  client.key_value_set(f"{_KV}/verdict/{me}", problem)
  if problem:
    raise errors.UserError(
      f"{problem}; start every process with the same command and checkout"
    )


def _beats(client) -> dict[int, str]:
  """Every process's beat value, ``{process: value}`` ({} on failure)."""
  try:
    pairs = client.key_value_dir_get(f"{_KV}/beat/")
  except Exception:  # noqa: BLE001 - the coordinator (process 0) is gone
    return {}
  return {int(k.rsplit("/", 1)[-1]): v for k, v in pairs}


class Watchdog:
  """Stops this process, with one line, when another process is lost.

  A daemon thread bumps this process's counter in the coordination
  service's key-value store every ``timeout / 10`` seconds and reads all
  the others' in one call. A counter that has not moved for ``timeout`` seconds (the
  process was killed, crashed or hangs) ends this process with
  ``error: process <i> of <n> is lost ...`` and exit status
  ``errors.EXIT_LOST_PROCESS``, wherever the main thread is (in a
  collective that will never complete, typically). The checkpoints on
  disk are complete (they are renamed into place), so the same command
  resumes. JAX's heartbeat timeout is twice ``timeout`` (``initialize``),
  so this line comes first. Losing process 0 takes the coordination
  service with it: JAX then stops the others at once with its own
  multi-line "Terminating process because the JAX distributed service
  detected fatal errors" report (no Python code can run first).
  """

  def __init__(self, timeout_s: float):
    import jax

    self.timeout = timeout_s
    self.me, self.n = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    self._thread = threading.Thread(
      target=self._run, name="leapalign-watchdog", daemon=True
    )

  def start(self) -> Watchdog:
    if self.n > 1:
      self._thread.start()
    return self

  def stop(self, outcome: str = "ok") -> None:
    """Ends the beats and tells the others how this process ended.

    ``"ok"``: the others stop watching it (a finished process is silent,
    not lost). Anything else is a one-line reason they stop with.
    """
    self._stop.set()
    if self.n > 1:
      with contextlib.suppress(Exception):
        _client().key_value_set(
          f"{_KV}/beat/{self.me}", "end:" + outcome, allow_overwrite=True
        )

  def _run(self) -> None:
    client = _client()
    period = max(0.05, self.timeout / 10)
    beat = 0
    seen = {i: (None, time.monotonic()) for i in range(self.n) if i != self.me}
    while not self._stop.wait(period) and seen:
      beat += 1
      with contextlib.suppress(Exception):  # the coordinator may be gone
        client.key_value_set(
          f"{_KV}/beat/{self.me}", str(beat), allow_overwrite=True
        )
      now = time.monotonic()
      beats = _beats(client)  # one call for all: pods have many processes
      for i, (last, since) in list(seen.items()):
        value = beats.get(i)
        if value is not None and value.startswith("end:"):
          del seen[i]
          if value != "end:ok" and not self._stop.is_set():
            self._exit(f"process {i} of {self.n} stopped: {value[4:]}")
        elif value is not None and value != last:
          seen[i] = (value, now)
        elif now - since > self.timeout and not self._stop.is_set():
          self._exit(
            f"process {i} of {self.n} is lost (no heartbeat for "
            f"{now - since:.0f} s: killed, crashed or hung)"
          )

  def wait_for_others(self, timeout_s: float) -> None:
    """Waits (at most ``timeout_s``) until every other process has ended.

    A failing process waits here before it exits: process 0 holds the
    coordination service, whose end aborts the others with JAX's report
    before they print their own line.
    """
    if self.n <= 1:
      return
    client = _client()
    deadline = time.monotonic() + timeout_s
    others = {i for i in range(self.n) if i != self.me}
    while others and time.monotonic() < deadline:
      beats = _beats(client)
      others = {i for i in others if not beats.get(i, "").startswith("end:")}
      time.sleep(0.05)
    if self.me == 0:
      time.sleep(0.5)  # the others' os._exit, after their last key read

  def _exit(self, what: str) -> None:
    self.stop(what)
    print(
      f"error: {what}; process {self.me} stops too. Rerun the same command "
      "to resume from the last checkpoint",
      file=sys.stderr,
      flush=True,
    )
    sys.stdout.flush()
    os._exit(errors.EXIT_LOST_PROCESS)


_WATCHDOG: Watchdog | None = None


def start(what: str) -> bool:
  """``initialize``, then (several processes) the watchdog and checks.

  Starts the ``Watchdog`` and runs ``check_same_start`` on ``what`` (the
  config, or a command's arguments, as JSON). True when the distributed
  runtime started.
  """
  if not initialize():
    return False
  start_watchdog()
  check_same_start(what)
  return True


def finish(status: int) -> None:
  """Tells the other processes how this one ends (``Watchdog.stop``).

  After a failure, waits a little for the others to end too
  (``Watchdog.wait_for_others``), so that each prints its own line.
  """
  stop_watchdog("ok" if not status else f"it exited with status {status}")
  if status and _WATCHDOG is not None:
    _WATCHDOG.wait_for_others(min(_WATCHDOG.timeout, 10.0))


def start_watchdog() -> None:
  """Starts this process's ``Watchdog`` (several processes only)."""
  global _WATCHDOG
  if _WATCHDOG is None:
    _WATCHDOG = Watchdog(heartbeat_timeout()).start()


def stop_watchdog(outcome: str = "ok") -> None:
  """``Watchdog.stop`` of the running watchdog, if any."""
  if _WATCHDOG is not None:
    _WATCHDOG.stop(outcome)


def lost_peer_error(e: BaseException) -> bool:
  """Whether ``e`` is a cross-process collective broken by a lost peer."""
  text = str(e)
  return _WATCHDOG is not None and (
    "Gloo" in text
    or "Connection reset by peer" in text
    or "Connection closed by peer" in text
  )


def exit_lost_peer(e: BaseException) -> None:
  """Waits for the ``Watchdog`` to name the lost process, then exits.

  A collective fails at once when a peer's connection drops (gloo on CPU),
  before the peer's heartbeats are missed; the watchdog's line, which
  names the process, is the useful one. If it has not come after the
  timeout, this one-line error ends the process instead.
  """
  time.sleep(1.5 * _WATCHDOG.timeout + 1)
  print(
    "error: a collective with the other processes failed ("
    + errors.one_line(e)[:200]
    + "); another process is gone. Rerun the same command to resume from "
    "the last checkpoint",
    file=sys.stderr,
    flush=True,
  )
  os._exit(errors.EXIT_LOST_PROCESS)
