"""Every method and LeapAlign ablation on the digits world, several seeds.

From one base model (the digits world, built once in ``<out>/world``), each
variant aligns for the same number of iterations with seeds 0..S-1, then the
EMA weights are evaluated on the 250 held-out prompts (every digit x colour x
position once). Reported per variant, as mean ± std over seeds: the in-domain
reward (the CLIP reward on the held-out prompts), the held-out evaluator's
accuracy per attribute (never a training reward), and per variant the
compiled step's median time and temporary memory. The step times are taken
one variant after another in one process before any run (same batch,
nothing else running), so they compare; each run's training-log mean step
time is in the JSON (``step_s``) but depends on what else the machine ran.

  python bench/compare_methods.py [--seeds 3] [--steps 100] [--out DIR]
      [--variants leapalign,refl,...] [--config configs/digits.py]
      [--points 4] [--no-compiled] [--first-seed 0] [--name NAME]

The GRPO family (``flow_grpo``, ``dance_grpo``, ``mix_grpo``) runs with the
CLIP reward and, as ``<method> rule``, with the rule-based reward
(``digits_rule``: no gradient, so only they can train on it). GRPO makes G
images per prompt, so runs are compared against images generated and
training wall-clock, not only iterations: with ``--points K`` each run
stops K times (resuming exactly), and the EMA weights are evaluated at
each stop; ``<name>_accuracy_vs_time.png`` plots held-out accuracy and the
rule reward against training seconds (compilation and evaluation
excluded) and images generated.

Writes ``<out>/<name>.{json,md}`` and ``<name>_reward_curves.png``; runs
that finished are reused, so an interrupted benchmark resumes.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from leapalign_jax import configs_io, metrics, train

# name -> config overrides. Baselines use their paper defaults (method.md).
VARIANTS = {
  "leapalign": [],
  "refl": ["method='refl'"],
  "draft_lv": ["method='draft_lv'"],
  "draft_k": ["method='draft_k'"],
  "drtune": ["method='drtune'"],
  "full_backprop": ["method='full_backprop'"],
  "leapalign alpha=0": ["leap.alpha=0.0"],
  "leapalign alpha=1": ["leap.alpha=1.0"],
  "leapalign 1 leap": ["leap.num_leaps=1"],
  "leapalign 3 leaps": ["leap.num_leaps=3"],
  "leapalign no weighting": ["leap.weighting='none'"],
  # The GRPO family with the CLIP reward (no reward gradient used): 8
  # prompts x 4 images = the 32 images per step the others generate, two
  # PPO updates per rollout; MixGRPO's window moves every 10 iterations.
  **{
    name: [
      f"method={name!r}",
      "data.global_batch=8",
      "grpo.group_size=4",
      "grpo.num_updates=2",
      *(["grpo.window_interval=10"] if name == "mix_grpo" else []),
    ]
    for name in ("flow_grpo", "dance_grpo", "mix_grpo")
  },
}
# The GRPO family on the rule-based reward (rewards.rule, `digits_rule`: a
# classifier's argmax checked against the prompt; no gradient). The CLIP
# reward stays at weight 0: reported, and the rule reads its prompt ids.
for _name in ("flow_grpo", "dance_grpo", "mix_grpo"):
  VARIANTS[f"{_name} rule"] = [
    *VARIANTS[_name],
    "rewards.clip.weight=0.0",
    "rewards.rule.weight=1.0",
  ]
# A probe of the PPO clip: the references' 1e-4 barely moves the policy in
# 60 iterations here; 0.2 is PPO's usual value.
for _name in ("flow_grpo", "flow_grpo rule"):
  VARIANTS[f"{_name} clip=0.2"] = [*VARIANTS[_name], "grpo.clip_range=0.2"]
GRPO = ("flow_grpo", "dance_grpo", "mix_grpo")
ATTRS = ("digit", "colour", "position", "all")
COLUMNS = (
  "reward/clip",
  "reward/rule",
  *(f"eval/{a}" for a in ATTRS),
  "eval/stray",
)


def slug(name: str) -> str:
  return name.replace(" ", "_").replace("=", "")


def variant_config(config_path, world, name, seed, steps, overwrite=True):
  overrides = [
    f"world_options.dir={world!r}",
    f"seed={seed}",
    f"train.num_steps={steps}",
    f"train.ckpt_every_steps={steps}",
    f"train.overwrite={overwrite}",
    "eval.before=False",
    "export.enabled=False",
    *VARIANTS[name],
  ]
  return configs_io.load_config(config_path, overrides)


def images_per_step(config) -> int:
  """Images generated per iteration (a GRPO rollout: G per prompt)."""
  n = int(config.data.global_batch)
  if config.method in GRPO:
    n *= int(config.grpo.group_size)
  return n


def train_seconds(lines) -> float:
  """Training wall time of logged steps (compile excluded).

  Each logged window's mean step time times its steps; the first step of
  each start (its compilation) is untimed and counted at the window mean.
  """
  total, last = 0.0, 0
  for x in lines:
    if "perf/step_s" in x:
      total += x["perf/step_s"] * (x["step"] - last)
    last = x["step"]
  return total


def run_one(config_path, world, out, name, seed, steps, points=1):
  """Aligns one (variant, seed); returns its record (reused if done).

  With ``points`` > 1 the run stops at ``points`` evenly spaced steps
  (resuming exactly each time) and the EMA weights are evaluated at each:
  the record's ``points`` give, per stop, the step, images generated,
  training seconds (without compilation or evaluation) and the evaluation.
  """
  workdir = os.path.join(out, "runs", f"{slug(name)}_s{seed}")
  done = os.path.join(workdir, "record.json")
  stops = sorted(
    {max(1, round(steps * (i + 1) / points)) for i in range(points)}
  )
  if os.path.exists(done):
    with open(done) as f:
      record = json.load(f)
    # Reused only if it ran these stops (an earlier, shorter benchmark in
    # the same folder must not stand for this one): else run it afresh.
    if [p["step"] for p in record.get("points", [])] == stops:
      return record
    os.remove(done)
  evals = []
  started = time.perf_counter()
  for stop in stops:
    # The first stop starts afresh; later ones resume the same run.
    config = variant_config(
      config_path, world, name, seed, stop, overwrite=stop == stops[0]
    )
    result = train.train_and_evaluate(config, workdir)
    evals.append((stop, result["after"]))
  wall = time.perf_counter() - started
  lines = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  # The first logged window includes compilation: leave it out.
  # (A resumed start's first step is untimed: windows may lack the key.)
  step_s = [x["perf/step_s"] for x in lines[1:] if "perf/step_s" in x] or [
    x["perf/step_s"] for x in lines if "perf/step_s" in x
  ]
  per_step = images_per_step(config)
  record = {
    "variant": name,
    "seed": seed,
    "after": evals[-1][1],
    "step_s": float(np.mean(step_s)),
    "images_per_step": per_step,
    "wall_s_with_evals": wall,
    "points": [
      {
        "step": stop,
        "images": stop * per_step,
        "train_s": train_seconds([x for x in lines if x["step"] <= stop]),
        "after": after,
      }
      for stop, after in evals
    ],
    "curve": [[x["step"], x["train/reward"]] for x in lines],
  }
  with open(done + ".tmp", "w") as f:
    json.dump(record, f)
  os.replace(done + ".tmp", done)
  return record


def partial_record(out, name, seed, config_path, world):
  """The record of an interrupted run: its last finished evaluation.

  For a run stopped before its record was written (``--collect``): the
  latest ``eval/after/eval.json``, at the last checkpoint saved before it,
  with the training seconds up to that step. None if it has none.
  """
  workdir = os.path.join(out, "runs", f"{slug(name)}_s{seed}")
  path = os.path.join(workdir, "eval", "after", "eval.json")
  ckpts = os.path.join(workdir, "checkpoints")
  if not (os.path.exists(path) and os.path.isdir(ckpts)):
    return None
  with open(path) as f:
    after = json.load(f)
  made = os.path.getmtime(path)
  steps = [
    int(d)
    for d in os.listdir(ckpts)
    if d.isdigit() and os.path.getmtime(os.path.join(ckpts, d)) < made
  ]
  if not steps:
    return None
  stop = max(steps)
  lines = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  lines = [x for x in lines if x["step"] <= stop]
  per_step = images_per_step(variant_config(config_path, world, name, seed, 1))
  step_s = [x["perf/step_s"] for x in lines[1:] if "perf/step_s" in x]
  return {
    "variant": name,
    "seed": seed,
    "after": after,
    "step_s": float(np.mean(step_s)) if step_s else float("nan"),
    "images_per_step": per_step,
    "partial": True,
    "points": [
      {
        "step": stop,
        "images": stop * per_step,
        "train_s": train_seconds(lines),
        "after": after,
      }
    ],
    "curve": [[x["step"], x["train/reward"]] for x in lines],
  }


def compiled_figures(config_path, world, out, name, steps, repeats=20):
  """The compiled step's median time and temporary memory (seed 0)."""
  path = os.path.join(out, "compiled.json")
  known = {}
  if os.path.exists(path):
    with open(path) as f:
      known = json.load(f)
  if name not in known:
    from compiled_step import compile_step
    from timing import median_time

    config = variant_config(config_path, world, name, 0, steps)
    compiled, args, _ = compile_step(config, out)
    known[name] = {
      "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
      "step_s": median_time(lambda: compiled(*args)[1], repeats),
    }
    with open(path + ".tmp", "w") as f:
      json.dump(known, f)
    os.replace(path + ".tmp", path)
  return known[name]


def base_eval(config_path, world, out):
  """The base model's evaluation (the 'before' row)."""
  path = os.path.join(out, "base_eval.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  from leapalign_jax import components, evaluation, sharding, worlds

  config = configs_io.load_config(config_path, [f"world_options.dir={world!r}"])
  config = worlds.prepare(config, out)
  comps = components.load(config, sharding.mesh_from_config(config.mesh))
  summary = evaluation.evaluate(comps, comps.params, out, "base")
  with open(path, "w") as f:
    json.dump(summary, f)
  return summary


def table(base, records, figures, names) -> str:
  """Mean ± std over seeds per variant; columns the base evaluation has."""
  cols = [c for c in COLUMNS if c in base]
  timed = bool(figures)
  head = ["variant", *cols, "images", "train s"]
  if timed:
    head += ["step s", "temp MiB"]
  rows = [
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
    "| base model | "
    + " | ".join(f"{base[c]:.3f}" for c in cols)
    + " | 0 | 0 |"
    + (" | |" if timed else ""),
  ]
  for name in names:
    rs = [r for r in records if r["variant"] == name]
    if not rs:
      continue
    cells = []
    for c in cols:
      v = np.array([r["after"][c] for r in rs])
      cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
    last = [r["points"][-1] if r.get("points") else None for r in rs]
    if all(last):
      cells.append(str(last[0]["images"]))
      cells.append(f"{np.mean([p['train_s'] for p in last]):.0f}")
    else:
      cells += ["", ""]
    if timed:
      cells.append(f"{figures[name]['step_s']:.3f}")
      cells.append(f"{figures[name]['temp_bytes'] / 2**20:.1f}")
    rows.append(f"| {name} (n={len(rs)}) | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def plot(records, names, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(9, 5))
  for name in names:
    curves = [np.array(r["curve"]) for r in records if r["variant"] == name]
    if not curves:
      continue
    n = min(len(c) for c in curves)
    mean = np.mean([c[:n, 1] for c in curves], 0)
    ax.plot(curves[0][:n, 0], mean, label=name)
  ax.set_xlabel("iteration")
  ax.set_ylabel("training reward (window mean, mean over seeds)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _x(point, key, name, figures):
  """A stop's x value: images, or seconds (idle step time if measured)."""
  if key == "train_s" and figures and name in figures:
    return point["step"] * figures[name]["step_s"]
  return point[key]


def plot_points(base, records, names, path, header, figures=None):
  """Held-out accuracy and rewards vs training seconds and images.

  One line per variant: the mean over seeds at each evaluation stop (the
  base model at 0), error bars = std over seeds. With ``figures`` (the
  compiled steps timed one after another on the idle machine) the time
  axis is iterations x that step time, so runs that shared the machine
  with others still compare; without, the runs' own logged step times.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics_ = [m for m in ("eval/digit", "eval/all", "reward/rule") if m in base]
  fig, axes = plt.subplots(
    len(metrics_), 2, figsize=(12, 3.4 * len(metrics_)), squeeze=False
  )
  for name in names:
    rs = [r for r in records if r["variant"] == name and r.get("points")]
    if not rs:
      continue
    n = min(len(r["points"]) for r in rs)
    for row, m in enumerate(metrics_):
      ys = np.array(
        [[base[m]] + [p["after"][m] for p in r["points"][:n]] for r in rs]
      )
      for col, key in enumerate(("train_s", "images")):
        xs = np.array(
          [
            [0.0] + [_x(p, key, name, figures) for p in r["points"][:n]]
            for r in rs
          ]
        )
        style = "--" if name.endswith(" rule") else "-"
        axes[row, col].errorbar(
          xs.mean(0),
          ys.mean(0),
          yerr=ys.std(0),
          fmt=style + "o",
          markersize=3,
          capsize=2,
          label=name,
        )
  for row, m in enumerate(metrics_):
    axes[row, 0].set_ylabel(f"held-out {m}")
    axes[row, 0].set_xlabel(
      "iterations x idle compiled step s"
      if figures
      else "training wall-clock s (no compile, no eval)"
    )
    axes[row, 1].set_xlabel("images generated")
  axes[0, 1].legend(fontsize=7)
  fig.suptitle(header, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--out", default="runs/compare_methods")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--first-seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument(
    "--points",
    type=int,
    default=1,
    help="held-out evaluations per run, evenly spaced (1: at the end)",
  )
  parser.add_argument(
    "--no-compiled",
    action="store_true",
    help="skip the compiled step's isolated timing and memory",
  )
  parser.add_argument("--name", default="compare_methods")
  parser.add_argument(
    "--collect",
    action="store_true",
    help="run nothing: report finished runs and interrupted ones' last "
    "evaluation (partial_record)",
  )
  parser.add_argument("--variants", default=",".join(VARIANTS))
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.variants.split(",")]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  out = os.path.abspath(args.out)
  world = os.path.join(out, "world")
  os.makedirs(out, exist_ok=True)
  base = base_eval(args.config, world, out)
  # Timed first, one variant after another, while nothing else runs.
  figures = {}
  if not args.no_compiled:
    figures = {
      name: compiled_figures(args.config, world, out, name, args.steps)
      for name in names
    }
  seeds = range(args.first_seed, args.first_seed + args.seeds)
  records = []
  for seed in seeds:  # seed-major: early stops cover variants
    for name in names:
      if args.collect:
        done = os.path.join(out, "runs", f"{slug(name)}_s{seed}", "record.json")
        if os.path.exists(done):
          with open(done) as f:
            records.append(json.load(f))
        else:
          r = partial_record(out, name, seed, args.config, world)
          if r is not None:
            records.append(r)
        continue
      records.append(
        run_one(args.config, world, out, name, seed, args.steps, args.points)
      )
      print(f"done {name} seed {seed}", file=sys.stderr, flush=True)
  md = table(base, records, figures, names)
  stamp = datetime.date.today().isoformat()
  machine = (
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
  )
  header = (
    f"digits world, {args.steps} iterations, seeds {seeds[0]}..{seeds[-1]}, "
    f"{stamp}, {machine}"
  )
  print(header + "\n\n" + md)
  with open(os.path.join(out, f"{args.name}.md"), "w") as f:
    f.write(header + "\n\n" + md + "\n")
  with open(os.path.join(out, f"{args.name}.json"), "w") as f:
    json.dump(
      {"header": header, "base": base, "compiled": figures, "records": records},
      f,
    )
  plot(records, names, os.path.join(out, f"{args.name}_reward_curves.png"))
  if args.points > 1 or args.collect:
    plot_points(
      base,
      records,
      names,
      os.path.join(out, f"{args.name}_accuracy_vs_time.png"),
      header,
      figures,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
