"""cli.usage: the --help text of a command, against absl's own flag registry."""

from absl import flags

from samtone_jax import cli
from samtone_jax import demo  # pylint: disable=unused-import  (registers the demo's flags)


def _entries(text: str) -> set[str]:
  return {line[4:].split(":", 1)[0].removeprefix("[no]") for line in text.splitlines()
          if line.startswith("  --")}


def test_demo_usage_leaves_out_only_the_refused_gin_flags():
  every = _entries(cli.usage("doc"))
  shown = _entries(cli.usage("doc", cli.DEMO_HIDDEN_FLAGS))
  assert every - shown == set(cli.DEMO_HIDDEN_FLAGS)
  # What stays: every other samtone_jax flag, the demo's own included, with its help text.
  registry = flags.FLAGS.flags_by_module_dict()
  demo_flags = {f.name for f in registry["samtone_jax.demo"]}
  assert {"seeds", "train_steps", "binding"} <= demo_flags <= shown
  assert {"gin_search_paths", "compilation_cache_dir", "verbose"} <= shown
  text = cli.usage("doc", cli.DEMO_HIDDEN_FLAGS)
  for name in cli.DEMO_HIDDEN_FLAGS:  # no line of a hidden entry survives
    assert flags.FLAGS[name].help not in text
  assert flags.FLAGS["seeds"].help.split()[0] in text
  assert text.startswith("doc\n\nflags:")
