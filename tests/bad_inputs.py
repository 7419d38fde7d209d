"""Bad inputs through the real command lines: the table and its checker.

Shared by ``tests/reliability_test.py`` and ``bench/reliability.py``. Every
case runs one command in a subprocess and must give exit status 2, exactly
one ``error:`` line holding the case's key words, no traceback, nothing
written into a fresh workdir, and no change to a finished run's
``config.json``, checkpoints, metrics and export.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import crash_harness as ch
import numpy as np

TINY = str(ch.REPO / "configs" / "tiny.py")
EXIT_USER_ERROR = 2


def make_bad_files(world: str, root: str) -> dict[str, str]:
  """Damaged copies of a world's files, prompt files and a bad config."""
  sys.path.insert(0, str(ch.REPO))
  from leapalign_jax.convert import safetensors_io

  root_p = Path(root)
  root_p.mkdir(parents=True, exist_ok=True)
  src = Path(world) / "transformer"
  weights = src / "diffusion_pytorch_model.safetensors"
  out = {"root": root, "world": world}
  for name in ("truncated", "corrupt"):
    folder = root_p / name
    shutil.copytree(src, folder)
    path = folder / weights.name
    data = path.read_bytes()
    if name == "truncated":
      data = data[: len(data) // 2]
    else:  # garbage where the JSON header starts
      data = data[:8] + b"\x00{not json" + data[18:]
    path.write_bytes(data)
    out[name] = str(folder)
  # A sharded diffusers folder whose index was not downloaded.
  sharded = root_p / "no_index"
  source = safetensors_io.TensorSource.from_files([str(weights)])
  safetensors_io.save_sharded(
    {k: np.asarray(source[k]) for k in source}, str(sharded), max_shard_bytes=1
  )
  shutil.copy(src / "config.json", sharded)
  os.remove(sharded / "diffusion_pytorch_model.safetensors.index.json")
  out["no_index"] = str(sharded)
  (root_p / "empty.txt").write_text("\n  \n")
  (root_p / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
  (root_p / "long.txt").write_text(
    "a red digit seven " + "and a very long tail " * 40 + "\n"
  )
  (root_p / "bad_reward.py").write_text(
    "import importlib.util\n\nimport ml_collections\n\n"
    f"spec = importlib.util.spec_from_file_location('tiny', {TINY!r})\n"
    "tiny = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(tiny)\n\n\n"
    "def get_config(arg=None):\n"
    "  c = tiny.get_config(arg)\n"
    "  c.rewards = ml_collections.ConfigDict(\n"
    "    {'hpsv3': {'weight': 1.0, 'path': ''}}\n"
    "  )\n"
    "  return c\n"
  )
  return out


def _module(name: str, *args: str) -> list[str]:
  return [sys.executable, "-m", f"leapalign_jax.{name}", *args]


def _explicit_paths(world: str, flux: str) -> list[str]:
  """Flags for a run without a world: every path given by hand."""
  return [
    "--config.world=",
    f"--config.flux.path={flux}",
    f"--config.vae.path={world}/vae",
    f"--config.rewards.clip.path={world}/reward_clip",
    f"--config.data.train_cache={world}/cache_train",
    f"--config.data.eval_cache={world}/cache_eval",
  ]


def _text(world: str) -> list[str]:
  """``key=value`` overrides pointing the text encoders at the world.

  The reward's path too: each reward's ids come from its own tokenizer.
  """
  return [
    f"text.clip_path={world}/text_encoder",
    f"text.t5_path={world}/text_encoder_2",
    f"text.t5_tokenizer={world}/tokenizer_2",
    f"rewards.clip.path={world}/reward_clip",
  ]


class Case:
  """One bad input: its command and the key words of its error line.

  ``argv(bad, fresh, run)`` gets the damaged files, a fresh workdir and a
  copy of a finished run (``run_flags`` are that run's flags); ``prepare``
  damages the copy first, if the case needs it.
  """

  def __init__(
    self,
    argv: Callable[..., list[str]],
    words: list[str],
    prepare: Callable[[str, int], None] | None = None,
  ):
    self.argv, self.words, self.prepare = argv, words, prepare


def _main(extra: Callable[[dict, str, str], list[str]], on_run: bool = False):
  """A ``main`` case on the fresh workdir (or the finished run's copy)."""

  def argv(b, fresh, run, run_flags):
    workdir = run if on_run else fresh
    return ch.train_command(
      workdir, b["world"], *run_flags, *extra(b, fresh, run)
    )

  return argv


def _embed(*args: str, text: bool = True):
  def argv(b, fresh, run, run_flags):
    del run, run_flags
    rest = [a.format(**b, fresh=fresh) for a in args]
    return _module(
      "embed_prompts", "--config", TINY, *rest, *(_text(b["world"]) * text)
    )

  return argv


def _damage_latest_checkpoint(run: str, num_steps: int) -> None:
  state = Path(run) / "checkpoints" / str(num_steps) / "state"
  for p in state.iterdir():
    if p.name.startswith("ocdbt") or p.name == "d":
      shutil.rmtree(p)


def _damage_config_json(run: str, num_steps: int) -> None:
  del num_steps
  with open(Path(run) / "config.json", "a") as f:
    f.write("}{")


def _workdir_is_a_file(b, fresh, run, run_flags):
  del run
  Path(fresh).write_text("not a folder\n")
  return ch.train_command(fresh, b["world"], *run_flags)


def _convert_into_a_file(b, fresh, run, run_flags):
  del run, run_flags
  Path(fresh).write_text("not a folder\n")
  src = f"{b['world']}/transformer"
  return _module("convert", "flux", "--src", src, "--dst", f"{fresh}/out")


def _bad_reward(b, fresh, run, run_flags):
  argv = ch.train_command(fresh, b["world"], *run_flags)
  argv[argv.index("--config") + 1] = f"{b['root']}/bad_reward.py"
  return argv


CASES: dict[str, Case] = {
  "unknown config key": Case(
    _main(lambda b, f, r: ["--config.optim.lrr=1"]),
    ["--config.optim.lrr", "no field", "lr"],
  ),
  "misspelled config section": Case(
    _main(lambda b, f, r: ["--config.optimm.lr=1"]),
    ["optimm", "no field", "optim"],
  ),
  "value of the wrong type": Case(
    _main(lambda b, f, r: ["--config.optim.lr=fast"]),
    ["optim.lr", "fast"],
  ),
  "missing config file": Case(
    lambda b, f, r, rf: _module(
      "main", "--config", "configs/nope.py", "--workdir", f
    ),
    ["configs/nope.py", "no such config file"],
  ),
  "unknown method": Case(
    _main(lambda b, f, r: ["--config.method=leapalgn"]),
    ["leapalgn", "valid methods", "leapalign"],
  ),
  "batch not divisible by the mesh": Case(
    _main(
      lambda b, f, r: [
        "--config.mesh.num_devices=8",
        "--config.data.global_batch=12",
      ]
    ),
    ["global_batch", "12", "divisible", "multiple of 8"],
  ),
  "more devices than visible": Case(
    _main(lambda b, f, r: ["--config.mesh.num_devices=16"]),
    ["num_devices=16", "8 devices"],
  ),
  "missing weights": Case(
    _main(
      lambda b, f, r: _explicit_paths(
        b["world"], f"{b['root']}/nope.safetensors"
      )
    ),
    ["flux.path", "nope.safetensors", "does not exist"],
  ),
  "truncated safetensors": Case(
    _main(lambda b, f, r: _explicit_paths(b["world"], b["truncated"])),
    ["truncated", "re-download"],
  ),
  "corrupt safetensors": Case(
    _main(lambda b, f, r: _explicit_paths(b["world"], b["corrupt"])),
    ["safetensors", "corrupt"],
  ),
  "diffusers folder without its index": Case(
    _main(lambda b, f, r: _explicit_paths(b["world"], b["no_index"])),
    ["no index", "index json"],
  ),
  "weights of another model": Case(
    _main(lambda b, f, r: _explicit_paths(b["world"], f"{b['world']}/vae")),
    ["no Flux transformer weights", "diffusers folder"],
  ),
  "weights of the wrong variant": Case(
    _main(
      lambda b, f, r: [
        *_explicit_paths(b["world"], f"{b['world']}/transformer"),
        "--config.flux.variant=schnell",
      ]
    ),
    ["do not fit", "variant", "hidden_size"],
  ),
  "unknown reward name": Case(
    _bad_reward,
    ["unknown reward", "hpsv3", "aesthetic", "clip", "hpsv2", "pickscore"],
  ),
  "workdir of a different config": Case(
    _main(lambda b, f, r: ["--config.optim.lr=0.5"], on_run=True),
    ["different config", "optim.lr", "overwrite"],
  ),
  "damaged latest checkpoint": Case(
    _main(lambda b, f, r: [], on_run=True),
    ["cannot be restored", "move it aside", "previous one (step"],
    prepare=_damage_latest_checkpoint,
  ),
  "workdir is a file": Case(
    _workdir_is_a_file, ["--workdir", "cannot create", "writable folder"]
  ),
  "workdir with a damaged config.json": Case(
    _main(lambda b, f, r: [], on_run=True),
    ["config.json", "not valid JSON"],
    prepare=_damage_config_json,
  ),
  "workdir in use": Case(
    _main(lambda b, f, r: [], on_run=True),
    ["in use by another run", "--workdir"],
  ),
  "empty prompt file": Case(
    _embed("--prompts", "{root}/empty.txt", "--out", "{fresh}"),
    ["empty.txt", "no prompts"],
  ),
  "missing prompt file": Case(
    _embed("--prompts", "{root}/no.txt", "--out", "{fresh}"),
    ["no.txt", "no such prompt file"],
  ),
  "prompt file not UTF-8": Case(
    _embed("--prompts", "{root}/latin1.txt", "--out", "{fresh}"),
    ["latin1.txt", "UTF-8"],
  ),
  "prompt file is a folder": Case(
    _embed("--prompts", "{root}", "--out", "{fresh}"),
    ["is a folder", ".txt"],
  ),
  "embed_prompts unknown override": Case(
    _embed(
      "--prompts",
      "{root}/long.txt",
      "--out",
      "{fresh}",
      "text.batch_sizee=3",
      text=False,
    ),
    ["text.batch_sizee", "no such field"],
  ),
  "cache of other encoders": Case(
    _embed(
      "--prompts",
      "{root}/long.txt",
      "--out",
      "{world}/cache_train",
      "text.t5_max_length=8",
    ),
    ["other encoders", "new folder"],
  ),
  "sample unknown override": Case(
    lambda b, f, r, rf: _module(
      "sample", "--config", TINY, "--prompt", "a 7", "--out", f, "optim.lrr=1"
    ),
    ["optim.lrr", "no such field"],
  ),
  "evaluate a workdir without checkpoints": Case(
    lambda b, f, r, rf: _module("evaluate", "--config", TINY, "--workdir", f),
    ["no checkpoints", "--workdir"],
  ),
  "convert a truncated file": Case(
    lambda b, f, r, rf: _module(
      "convert",
      "flux",
      "--src",
      f"{b['truncated']}/diffusion_pytorch_model.safetensors",
      "--dst",
      f,
    ),
    ["truncated", "re-download"],
  ),
  "convert into an unwritable place": Case(
    _convert_into_a_file, ["fresh", "check the path", "permissions"]
  ),
  "convert a folder without its index": Case(
    lambda b, f, r, rf: _module(
      "convert", "flux", "--src", b["no_index"], "--dst", f
    ),
    ["no index", "index json"],
  ),
}


def _protected(run: str) -> dict[str, str]:
  """Digests of the files of a finished run a refused start must not touch."""
  return {
    k: v
    for k, v in ch.tree_digest(run).items()
    if k.startswith(("checkpoints", "config.json", "metrics.jsonl", "export"))
  }


@contextlib.contextmanager
def _held_lock(run: str):
  """Holds ``run`` 's workdir lock, as a live training process would."""
  with open(os.path.join(run, ".lock"), "a+") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    yield


def check(
  name: str,
  bad: dict,
  finished_run: str,
  run_flags: tuple[str, ...],
  num_steps: int,
  scratch: str,
  env: dict,
) -> tuple[list[str], str]:
  """Runs case ``name``; returns ``(problems, its error line)``."""
  case = CASES[name]
  fresh, run = os.path.join(scratch, "fresh"), os.path.join(scratch, "run")
  shutil.copytree(finished_run, run)
  if case.prepare is not None:
    case.prepare(run, num_steps)
  before = _protected(run)
  lock = (
    _held_lock(run) if name == "workdir in use" else contextlib.nullcontext()
  )
  with lock:
    out = ch.run(case.argv(bad, fresh, run, run_flags), env)
  lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
  line = lines[0] if lines else ""
  problems = []
  if out.returncode != EXIT_USER_ERROR:
    problems.append(f"exit status {out.returncode}")
  if "Traceback" in out.stderr:
    problems.append("a traceback: " + out.stderr[-1500:])
  if len(lines) != 1:
    problems.append(f"{len(lines)} error lines: {out.stderr[-1500:]}")
  problems += [f"no {w!r}" for w in case.words if w.lower() not in line.lower()]
  if _protected(run) != before:
    problems.append("the finished run was changed")
  problems += [
    f"wrote {n} into a fresh workdir"
    for n in ("config.json", "checkpoints", "metrics.jsonl", "export")
    if os.path.exists(os.path.join(fresh, n))
  ]
  return problems, line
