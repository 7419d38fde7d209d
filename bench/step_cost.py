"""Training-step cost vs the number of sampling steps N.

For N in {4, 8, 16, 25, 50} and the methods leapalign, draft_k and
full_backprop, compiles the real train step (``step.make_train_step``) of a
CPU-sized random world (tiny Flux / autoencoder / CLIP reward, loaded through
the production loaders) and reports its compiled temporary memory
(``memory_analysis().temp_size_in_bytes``) and its median wall time.

LeapAlign's time is compared with its own cost model, timed as parts in the
same process: ``(N - 2)`` Flux forwards + 2 Flux forward+backward passes (the
vjps at k and j, T forwards in total) + decode and reward forward+backward +
the optimizer/EMA update.

  python bench/step_cost.py [--steps 4,8,16,25,50] [--repeats 5]

Prints a table and writes ``bench/results/step_cost.json`` (records with
``method, num_steps, temp_bytes, step_s, cost_model_s``).
"""

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
from compiled_step import compile_step
from timing import median_time

from leapalign_jax import configs_io
from leapalign_jax import step as step_lib

# "leapalign@recompute": the T + 2-forward variant (leap.grad_passes).
METHODS = ("leapalign", "leapalign@recompute", "draft_k", "full_backprop")


def config_for(world_dir, method, num_steps, hidden, batch, size):
  method, _, passes = method.partition("@")
  extra = [f"leap.grad_passes={passes!r}"] if passes else []
  return configs_io.load_config(
    "configs/tiny.py",
    [
      f"world_options.dir={world_dir!r}",
      f"world_options.flux_hidden={hidden}",
      f"sampling.height={size}",
      f"sampling.width={size}",
      "mesh.num_devices=1",
      f"method={method!r}",
      f"sampling.num_steps={num_steps}",
      f"data.global_batch={batch}",
      *extra,
    ],
  )


def parts(comps, state, batch, repeats):
  """Median times of the cost model's parts on the same batch."""
  fns, frozen = comps.step_fns, comps.frozen
  params = state["params"]
  x = fns.noise(jax.random.key(0), batch["t5"].shape[0])
  t = jnp.full((x.shape[0],), 0.5, jnp.float32)
  fwd = jax.jit(lambda p, x: fns.velocity(p, frozen["model"], x, t, batch))

  @jax.jit
  def vjp(p, x):
    v, pull = jax.vjp(
      lambda p: fns.velocity(p, frozen["model"], x, t, batch), p
    )
    return pull(v)

  @jax.jit
  def reward(x):
    return jax.grad(lambda x: jnp.sum(fns.reward(frozen, x, batch)))(x)

  tx = step_lib.make_optimizer(comps.config.optim)

  @jax.jit
  def update(p, g, opt):
    import optax

    u, opt = tx.update(g, opt, p)
    p = optax.apply_updates(p, u)
    return p, jax.tree.map(lambda e, q: e + 0.005 * (q - e), p, p), opt

  grads = jax.tree.map(jnp.ones_like, params)
  return {
    "forward_s": median_time(lambda: fwd(params, x), repeats, warmup=3),
    "vjp_s": median_time(lambda: vjp(params, x), repeats, warmup=3),
    "reward_s": median_time(lambda: reward(x), repeats, warmup=3),
    "update_s": median_time(
      lambda: update(params, grads, state["opt_state"]), repeats, warmup=3
    ),
  }


def measure(world_dir, method, num_steps, hidden, batch, size, repeats):
  config = config_for(world_dir, method, num_steps, hidden, batch, size)
  compiled, args, comps = compile_step(config, world_dir)
  state, _, batch_arr, _ = args
  temp = compiled.memory_analysis().temp_size_in_bytes
  # Three warm-up calls: the first configuration of a process otherwise
  # times ~20% slow (thread pool and allocator still warming up).
  step_s = median_time(lambda: compiled(*args)[1], repeats, warmup=3)
  record = dict(
    method=method,
    num_steps=num_steps,
    temp_bytes=int(temp),
    step_s=step_s,
    cost_model_s=None,
  )
  if config.method == "leapalign":
    p = parts(comps, state, batch_arr, repeats)
    # reuse: T forwards of which 2 are vjps; recompute: T plain + 2 vjps.
    plain = num_steps - (2 if config.leap.grad_passes == "reuse" else 0)
    model = (
      plain * p["forward_s"] + 2 * p["vjp_s"] + p["reward_s"] + p["update_s"]
    )
    record.update(cost_model_s=model, parts=p)
  return record


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", default="4,8,16,25,50")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--world", default="/tmp/leapalign_bench_world_{hidden}_{size}"
  )
  parser.add_argument("--out", default="bench/results/step_cost.json")
  args = parser.parse_args()
  args.world = args.world.format(hidden=args.hidden, size=args.size)
  rows = []
  for method in args.methods.split(","):
    for n in map(int, args.steps.split(",")):
      r = measure(
        args.world, method, n, args.hidden, args.batch, args.size, args.repeats
      )
      rows.append(r)
      ratio = (
        f"{r['step_s'] / r['cost_model_s']:.2f}" if r["cost_model_s"] else "-"
      )
      print(
        f"{method:14} N={n:3d} temp={r['temp_bytes'] / 2**20:8.2f} MiB "
        f"step={r['step_s'] * 1e3:8.1f} ms model="
        f"{(r['cost_model_s'] or 0) * 1e3:8.1f} ms ratio={ratio} "
        f"{r.get('parts', '')}",
        flush=True,
      )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(
      [
        {
          k: r[k]
          for k in (
            "method",
            "num_steps",
            "temp_bytes",
            "step_s",
            "cost_model_s",
          )
        }
        for r in rows
      ],
      f,
      indent=2,
    )
  with open(args.out.replace(".json", "_details.json"), "w") as f:
    json.dump(
      dict(
        machine=dict(
          platform=platform.platform(),
          cpus=os.cpu_count(),
          jax=jax.__version__,
          load=os.getloadavg(),
        ),
        args=vars(args),
        results=rows,
      ),
      f,
      indent=2,
    )
  print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
