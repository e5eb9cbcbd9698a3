"""The package's layout rules, read from the source text (ARCHITECTURE.md, "Rules of the house").

- Entry modules (the commands: a module with an `if __name__ == "__main__":` block) are thin
  shells over library code: no module imports one, and none reaches into the step modules.
- The module-level import graph of `samtone_jax` has no cycle. (An import inside a function runs
  only when called; the model-kind dispatch uses a few to break what would otherwise be cycles.)
- Each `gin/runs/*.gin` file defines every macro it uses (alone or through its includes), so a run
  file never depends on a macro that only another run file defines.

The reference is Python's own `ast` module over the files and a textual read of the gin files,
independent of the code under test.
"""

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "samtone_jax"
GIN = REPO / "gin"


def _modules() -> dict[str, pathlib.Path]:
  """{dotted module name: file} of every module of the package (the gin/ link excluded)."""
  modules = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    relative = path.relative_to(REPO)
    if relative.parts[1] == "gin":
      continue
    name = ".".join(relative.with_suffix("").parts)
    modules[name.removesuffix(".__init__")] = path
  return modules


MODULES = _modules()


def _imported(module: str, node: ast.AST) -> list[str]:
  """The package modules an `import` / `from ... import` node names (a `from package import x`
  counts as importing module `package.x` when that is a module, else `package`)."""
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
  elif isinstance(node, ast.ImportFrom):
    base = node.module or ""
    if node.level:
      parts = module.split(".")
      if MODULES[module].name != "__init__.py":
        parts = parts[:-1]
      parts = parts[:len(parts) - node.level + 1]
      base = ".".join(parts + ([node.module] if node.module else []))
    names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
             for alias in node.names]
  else:
    return []
  found = []
  for name in names:
    while name not in MODULES and "." in name:
      name = name.rsplit(".", 1)[0]
    if name in MODULES and name != module:
      found.append(name)
  return found


def _import_graph(module_level_only: bool) -> dict[str, set[str]]:
  graph = {}
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    graph[module] = {dep for node in nodes for dep in _imported(module, node)}
  return graph


def _is_entry_module(path: pathlib.Path) -> bool:
  """True for a module with a top-level `if __name__ == "__main__":` block."""
  for node in ast.parse(path.read_text()).body:
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__"
                for c in node.test.comparators)):
      return True
  return False


ENTRY_MODULES = {m for m, path in MODULES.items() if _is_entry_module(path)}


def test_entry_modules_are_the_commands():
  # Every console script of pyproject.toml points at one of them (the list below is the README's).
  scripts = re.findall(r'^samtone-[\w-]+ = "([\w.]+):console_main"$',
                       (REPO / "pyproject.toml").read_text(), re.M)
  assert set(scripts) <= ENTRY_MODULES
  assert ENTRY_MODULES == {f"samtone_jax.{name}" for name in (
      "main", "evaluate", "encode", "mine", "export", "probe", "predict", "cache_tasks", "demo",
      "demo_mining", "demo_skill")}


def test_no_module_imports_an_entry_module():
  graph = _import_graph(module_level_only=False)
  offenders = sorted((module, dep) for module, deps in graph.items() for dep in deps
                     if dep in ENTRY_MODULES)
  assert not offenders, f"(importer, entry module) pairs: {offenders}"


def test_entry_modules_do_not_reach_into_the_step():
  # Abstract params, shardings and models come from evaluation/runner.py and partitioning.py.
  graph = _import_graph(module_level_only=False)
  step_modules = {"samtone_jax.train_step", "samtone_jax.seq2seq_step"}
  offenders = sorted((m, dep) for m in ENTRY_MODULES for dep in graph[m] & step_modules)
  assert not offenders, offenders


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as a path [a, b, ..., a], or None (iterative DFS, three colours)."""
  state: dict[str, int] = {}
  for root in sorted(graph):
    if root in state:
      continue
    stack = [(root, iter(sorted(graph[root])))]
    path = [root]
    state[root] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        state[node] = 2
        stack.pop()
        path.pop()
      elif state.get(child) == 1:
        return path[path.index(child):] + [child]
      elif child not in state:
        state[child] = 1
        stack.append((child, iter(sorted(graph[child]))))
        path.append(child)
  return None


def test_cycle_finder_on_known_graphs():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"a"}}) == ["a", "a"]


def test_module_level_import_graph_is_acyclic():
  graph = _import_graph(module_level_only=True)
  assert len(graph) > 50  # the whole package was read
  assert _cycle(graph) is None, _cycle(graph)


_INCLUDE = re.compile(r'^include\s+"([^"]+)"', re.M)
_DEFINITION = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=", re.M)
_REFERENCE = re.compile(r"%([A-Z][A-Z0-9_]*)\b")


def _macros(path: pathlib.Path) -> tuple[set[str], set[str]]:
  """(macros defined, macros referenced) by a gin file and, recursively, its includes."""
  text = re.sub(r"#.*", "", path.read_text())
  defined, used = set(_DEFINITION.findall(text)), set(_REFERENCE.findall(text))
  for include in _INCLUDE.findall(text):
    more_defined, more_used = _macros(GIN / include)
    defined |= more_defined
    used |= more_used
  return defined, used


def test_macro_reader_on_a_known_file(tmp_path):
  (tmp_path / "f.gin").write_text('# A = %IN_COMMENT\nA = %B\nx.y = %C  # %D\nB = 1\n')
  assert _macros(tmp_path / "f.gin") == ({"A", "B"}, {"B", "C"})


@pytest.mark.parametrize("run_file", sorted(p.name for p in (GIN / "runs").glob("*.gin")))
def test_run_files_define_the_macros_they_use(run_file):
  defined, used = _macros(GIN / "runs" / run_file)
  assert used <= defined, f"runs/{run_file} uses undefined macros {sorted(used - defined)}"


def test_demo_experiments_differ_in_the_loss_alone():
  """demo_in_batch.gin is demo_samtone.gin with losses/in_batch.gin: every argument of the run is
  the same but the loss, which is LossConfig's defaults (SamToNe) without same-tower negatives."""
  import gin  # pylint: disable=g-import-not-at-top
  from samtone_jax import gin_config  # pylint: disable=g-import-not-at-top
  from samtone_jax import losses  # pylint: disable=g-import-not-at-top
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top

  def arguments(experiment):
    gin.clear_config()
    try:
      gin_config.parse_gin([f"experiments/{experiment}.gin"], ['MODEL_DIR = "/tmp/unused"'])
      return dict(gin_config.configured_arguments(trainer.train))
    finally:
      gin.clear_config()

  in_batch, samtone = arguments("demo_in_batch"), arguments("demo_samtone")
  assert in_batch.pop("loss") == losses.LossConfig(same_tower_negatives=False)
  assert samtone.pop("loss") == losses.LossConfig()
  assert in_batch == samtone
  assert samtone["data"].mixture_or_task_name == "demo_manpages"  # the demo, not defaults
  assert samtone["loop"].train_steps == 300 and samtone["loop"].eval_sets == ["demo_manpages_test"]


def test_readme_layout_names_every_module():
  """README's Layout section names every module and subpackage of samtone_jax (so a new one is
  described where users look)."""
  readme = (REPO / "README.md").read_text()
  layout = readme[readme.index("\n## Layout\n"):readme.index("\n## References\n")]
  names = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
  missing = sorted(n for n in names if n != "__init__" and not re.search(rf"\b{n}\b", layout))
  assert not missing, f"README's Layout section does not name {missing}"
