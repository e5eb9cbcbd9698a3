"""A wheel built from the checkout works outside it: gin files shipped, console scripts usable.

The wheel is built from a copy of the checkout, installed with --no-deps into a fresh venv that
reuses the test venv's dependencies through a `.pth` line (not the test venv itself: its editable
install of samtone_jax must not leak in; a plain path line in a `.pth` file does not run the
editable finder's `.pth` hook), and `samtone-train --gin_file=experiments/demo_samtone.gin` runs two
steps from a directory outside the checkout.
"""

import configparser
import os
import pathlib
import shutil
import site
import subprocess
import sys
import zipfile

from samtone_jax import cli
from samtone_jax import gin_config
from samtone_jax import main as main_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Top-level entries of the checkout that a build does not need (and may be large).
_NOT_COPIED = {".git", "build", "dist", "demo_runs", "runs", ".pytest_cache", "tests",
               "benchmarks"}


def _copy_checkout(dest: pathlib.Path) -> None:
  def ignore(directory, names):
    ignored = {n for n in names if n.startswith(".venv") or n.endswith(".egg-info")
               or n == "__pycache__"}
    if pathlib.Path(directory) == REPO:
      ignored |= _NOT_COPIED & set(names)
    return ignored
  # symlinks=True: samtone_jax/gin stays a link to ../gin, as in git.
  shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)


def _gin_files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.gin")}


def test_wheel_ships_gin_and_trains_outside_checkout(tmp_path):
  source, wheels, venv, work = (tmp_path / n for n in ("src", "wheels", "venv", "elsewhere"))
  _copy_checkout(source)
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(wheels), str(source)], check=True, env=env)
  (wheel,) = wheels.glob("samtone_jax-*.whl")

  # Every gin file of the top-level gin/, byte for byte, under samtone_jax/gin/ in the wheel.
  with zipfile.ZipFile(wheel) as zf:
    shipped = {n.removeprefix("samtone_jax/gin/"): zf.read(n) for n in zf.namelist()
               if n.startswith("samtone_jax/gin/") and n.endswith(".gin")}
  expected = _gin_files(REPO / "gin")
  assert len(expected) > 30
  assert shipped == expected

  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  # --ignore-installed: pip must not look at (or try to uninstall) any other samtone_jax.
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                  "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                 check=True, env=env)
  # Only now make the dependencies visible (after pip, so it never sees the editable install).
  (venv_site,) = venv.glob("lib/python*/site-packages")
  (venv_site / "test_venv_dependencies.pth").write_text(
      "\n".join(site.getsitepackages()) + "\n")

  where = subprocess.run(
      [str(python), "-c", "import samtone_jax.gin_config as m; print(m.__file__); print(m.GIN_DIR)"],
      check=True, capture_output=True, text=True, env=env, cwd=work).stdout.split()
  assert where[0] == str(venv_site / "samtone_jax" / "gin_config.py")
  assert where[1] == str(venv_site / "samtone_jax" / "gin")

  # Every console script the wheel declares (its entry_points.txt) --help prints its entry
  # module's docstring and our flags, not only "Try --helpfull".
  entry_points = configparser.ConfigParser()
  with zipfile.ZipFile(wheel) as zf:
    (entry_file,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    entry_points.read_string(zf.read(entry_file).decode())
  scripts = {name: target.removeprefix("samtone_jax.").removesuffix(":console_main")
             for name, target in entry_points["console_scripts"].items()}
  assert len(scripts) >= 9 and scripts["samtone-train"] == "main", scripts
  for script, module in scripts.items():
    help_text = subprocess.run([str(venv / "bin" / script), "--help"], check=True,
                               capture_output=True, text=True, env=env, cwd=work).stdout
    doc = (REPO / "samtone_jax" / f"{module}.py").read_text().split('"""')[1].strip()
    assert help_text.startswith(doc), (script, help_text[:200])
    assert "--coordinator_address" in help_text, script
    # The demos refuse --gin_file / --gin.X (they parse their own experiments), so their help
    # leaves them out (cli.DEMO_HIDDEN_FLAGS); every other command takes them.
    assert ("--gin_file" in help_text) == (not module.startswith("demo")), script

  model_dir = work / "run"
  overrides = ["TRAIN_STEPS=2", "BATCH_SIZE=8", 'TASK_FEATURE_LENGTHS={"queries": 8, '
               '"passages": 8}', "EVAL_TASKS=[]", "config.T5Config.num_layers=1",
               "trainer.LoopConfig.checkpoint_period=2"]
  result = subprocess.run(
      [str(venv / "bin" / "samtone-train"), "--gin_file=experiments/demo_samtone.gin",
       f'--gin.MODEL_DIR="{model_dir}"', *[f"--gin.{o}" for o in overrides]],
      capture_output=True, text=True, env=dict(env, JAX_PLATFORMS="cpu"), cwd=work, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (model_dir / "config.gin").is_file()
  assert sorted(p.name for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_usage_has_docstring_and_flags():
  text = cli.usage(main_lib.__doc__)
  assert text.startswith(main_lib.__doc__.strip())
  for flag in ("--gin_file", "--gin_bindings", "--gin_search_paths", "--tfds_data_dir",
               "--process_count"):
    assert flag in text


def test_gin_files_resolve_from_any_directory(tmp_path, monkeypatch):
  """Both spellings of an experiment parse from outside the checkout, to the same config."""
  import gin  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  configs = []
  for spelling in ("experiments/demo_samtone.gin", "gin/experiments/demo_samtone.gin"):
    gin.clear_config()
    gin_config.parse_gin([spelling], [])
    configs.append(gin.config_str())
  gin.clear_config()
  assert configs[0] == configs[1]
  assert "samtone" in configs[0].lower()
