"""The Colab notebook runs top to bottom on a CPU with the tiny config.

Executed as CI does (nbclient) from a fresh clone, in a kernel whose Python
does not have leapalign_jax installed, so the install cell really installs
the clone (its dependencies are already there); one CPU device, the
workdir moved to a temporary folder; the hub cell is not taken. About 2 min
on 2 idle cores (install, world, sampler, step and evaluation compiles),
so the execution is marked ``slow``.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_PATH = os.path.join("notebooks", "leapalign_colab.ipynb")
NOTEBOOK = os.path.join(ROOT, NOTEBOOK_PATH)


def load():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_token_is_never_shown_or_stored():
  """The hub token only reaches the download calls."""
  code = "\n".join(c.source for c in load().cells if c.cell_type == "code")
  tree = ast.parse(code)
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      name = getattr(node.func, "id", getattr(node.func, "attr", ""))
      args = [ast.unparse(a) for a in node.args] + [
        ast.unparse(k.value) for k in node.keywords
      ]
      assert name != "login", "login() writes the token to disk"
      if name in ("print", "display", "write", "dump", "info", "warning"):
        assert not any("token" in a for a in args), ast.unparse(node)
  assert "del token" in code


def _fresh_clone(dest) -> str:
  """``git clone`` of this repository, with the work tree's changes on top."""
  subprocess.run(["git", "clone", "-q", ROOT, str(dest)], check=True)
  listing = subprocess.run(
    ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others"]
    + ["--exclude-standard"],
    check=True,
    capture_output=True,
  ).stdout.decode()
  for name in filter(None, listing.split("\0")):
    src = os.path.join(ROOT, name)
    if os.path.isfile(src):
      os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
      shutil.copy2(src, os.path.join(dest, name))
  return str(dest)


def _kernel_without_the_package(tmp_path) -> str:
  """A kernel in a new venv that sees this one's libraries, not the package.

  The venv's ``.pth`` line adds this environment's site-packages (their own
  ``.pth`` files, this checkout's editable install among them, are not
  read), so the notebook's install cell must install leapalign_jax, into
  the new venv, with every dependency already satisfied.
  """
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = venv / "bin" / "python"
  purelib = subprocess.run(
    [
      str(python),
      "-c",
      "import sysconfig; print(sysconfig.get_paths()['purelib'])",
    ],
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  with open(os.path.join(purelib, "this_env.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  spec = tmp_path / "jupyter" / "kernels" / "fresh-venv"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [str(python), "-m", "ipykernel_launcher", "-f"]
        + ["{connection_file}"],
        "display_name": "fresh venv",
        "language": "python",
      }
    )
  )
  return purelib


@pytest.mark.slow
def test_runs_top_to_bottom_on_cpu_from_a_fresh_clone(tmp_path, monkeypatch):
  clone = _fresh_clone(tmp_path / "clone")
  purelib = _kernel_without_the_package(tmp_path)
  nb = nbformat.read(os.path.join(clone, NOTEBOOK_PATH), as_version=4)
  # Parameters, as papermill would inject them: a temporary workdir.
  workdir = str(tmp_path / "run")
  nb.cells.insert(
    2, nbformat.v4.new_code_cell(f"WORKDIR = {workdir!r}\nNUM_TRAIN_STEPS = 2")
  )
  # The kernel inherits this environment: one CPU device, no checkout on
  # the path (the notebook must install the clone).
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # The notebook's programs, not XLA's optimiser, are under test.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  monkeypatch.delenv("PYTHONPATH", raising=False)
  client = nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name="fresh-venv",
    resources={"metadata": {"path": clone}},
  )
  client.execute()
  outputs = [o for c in nb.cells for o in c.get("outputs", ())]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  assert f"installed leapalign_jax from {clone}" in text
  assert "run: tiny (2 steps)" in text
  installed = [n for n in os.listdir(purelib) if n.startswith("leapalign_jax")]
  assert installed, os.listdir(purelib)
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 3  # base samples, EMA grid, reward curve
  assert os.path.isfile(os.path.join(workdir, "reward_curve.png"))
  assert os.path.isfile(os.path.join(workdir, "train", "metrics.jsonl"))


def test_colab_metadata_names_the_tpu():
  meta = load().metadata
  assert meta["accelerator"] == "TPU"
  assert meta["colab"]["gpuType"] == "V5E1"  # Colab's v5e-1 runtime
