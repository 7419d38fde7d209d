"""Shared by the benchmarks: the median wall time of a call."""

import statistics
import time

import jax


def median_time(fn, repeats: int, warmup: int = 1) -> float:
  """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

  JAX results are waited for (``block_until_ready``); anything else (e.g. a
  PyTorch tensor computed eagerly) is already done when ``fn`` returns.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)
