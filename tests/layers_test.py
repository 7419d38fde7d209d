"""Imports point down: the package's layers (docs/architecture.md).

Every ``import`` in ``leapalign_jax`` -- module-level or inside a function --
is read with ``ast`` and checked against the layer table below: a module may
import its own layer or lower ones, never a higher one, and the imports must
not close a loop (a cycle through function-level imports is still a knot).
A failure names the file and line of each offending import.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1] / "leapalign_jax"
PACKAGE = "leapalign_jax"

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
  (
    "base",
    (
      "",  # the package __init__
      "errors",
      "fileio",
      "utils",
      "locks",
      "configs_io",
      "images",
      "tokenizers",
      "openclip_tokenizer",
      "sharding",
      "metrics",
      "plots",
      "preemption",
      "distributed",
      "checkpoint",
    ),
  ),
  ("models", ("models",)),
  (
    "library",
    (
      "sampling",
      "sde",
      "leap",
      "methods",
      "rewards",
      "convert",
      "flops",
      "step",
      "prompts",
      "staging",
      "data",
    ),
  ),
  ("families", ("families", "defaults")),
  ("assembly", ("components", "abstract_run")),
  (
    "services",
    ("evaluation", "eval_table", "geneval", "generation", "export", "worlds"),
  ),
  (
    "commands",
    (
      "train",
      "evaluate",
      "sample",
      "curves",
      "aot",
      "embed_prompts",
      "staging.__main__",
      "convert.__main__",
      "export.__main__",
      "launch_local",
    ),
  ),
  ("entry", ("main",)),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def layer_of(module: str) -> str:
  best, best_len = None, -1
  for name, prefixes in LAYERS:
    for prefix in prefixes:
      if prefix == "":
        hit = module == ""
      else:
        hit = module == prefix or module.startswith(prefix + ".")
      if hit and len(prefix) > best_len:
        best, best_len = name, len(prefix)
  if best is None:
    raise AssertionError(
      f"{module or PACKAGE}: in no layer; add it to LAYERS in this test "
      "and to docs/architecture.md"
    )
  return best


def _exists(module: str) -> bool:
  path = ROOT.joinpath(*module.split(".")) if module else ROOT
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: pathlib.Path) -> list[tuple[str, int]]:
  """``(imported package module, line)`` for every import in the file."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
          out.append((alias.name[len(PACKAGE) + 1 :], node.lineno))
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.level or not (
        node.module == PACKAGE or node.module.startswith(PACKAGE + ".")
      ):
        continue
      base = node.module[len(PACKAGE) + 1 :]
      for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        # ``from pkg import name``: a submodule, or a name of pkg itself.
        out.append((sub if _exists(sub) else base, node.lineno))
  return out


def _graph():
  """``{module: [(imported, line, via_parent)]}`` over the package."""
  graph = {}
  files = {}
  for path in sorted(ROOT.rglob("*.py")):
    mod = module_name(path)
    files[mod] = path
    edges = []
    for target, line in imports_of(path):
      edges.append((target, line))
      # Importing a.b.c runs a/__init__ and a/b/__init__ first: from
      # outside a package its __init__ is imported too.
      parts = target.split(".")
      for n in range(1, len(parts)):
        parent = ".".join(parts[:n])
        if not (mod == parent or mod.startswith(parent + ".")):
          edges.append((parent, line))
    graph[mod] = sorted(set(edges), key=lambda e: (e[1], e[0]))
  return graph, files


GRAPH, FILES = _graph()


def test_every_module_has_a_layer():
  for mod in GRAPH:
    layer_of(mod)


def test_imports_point_down():
  bad = []
  for mod, edges in GRAPH.items():
    rank = RANK[layer_of(mod)]
    for target, line in edges:
      if RANK[layer_of(target)] > rank:
        rel = FILES[mod].relative_to(ROOT.parent)
        bad.append(
          f"{rel}:{line}: {mod or PACKAGE} ({layer_of(mod)}) imports "
          f"{target} ({layer_of(target)}), a higher layer"
        )
  assert not bad, "\n".join(bad)


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w, _ in graph.get(v, ()):
      if w == v:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in list(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_loops():
  loops = _cycles(GRAPH)
  lines = []
  for comp in loops:
    members = set(comp)
    for mod in comp:
      for target, line in GRAPH[mod]:
        if target in members and target != mod:
          rel = FILES[mod].relative_to(ROOT.parent)
          lines.append(f"{rel}:{line}: {mod} imports {target}")
  assert not loops, "import loops:\n" + "\n".join(lines)


def test_library_code_imports_no_command():
  commands = {m for m in GRAPH if layer_of(m) == "commands"}
  for cmd in commands:  # a command is a file with a __main__ entry
    text = FILES[cmd].read_text()
    assert "__main__" in text or cmd.endswith("__main__") or cmd == "train"
  for mod, edges in GRAPH.items():
    if layer_of(mod) in ("commands", "entry"):
      continue
    for target, line in edges:
      assert target not in commands, f"{FILES[mod]}:{line} imports {target}"


@pytest.mark.parametrize(
  "source, expect",
  [
    ("from leapalign_jax import components\n", "higher layer"),
    ("def f():\n  from leapalign_jax import train\n", "higher layer"),
  ],
)
def test_the_check_catches_an_upward_import(source, expect, tmp_path):
  # A library module that imported the assembly or a command would fail.
  path = tmp_path / "x.py"
  path.write_text(source)
  ((target, line),) = imports_of(path)
  assert RANK[layer_of(target)] > RANK[layer_of("sampling")], expect
  assert line == source.count("\n")
