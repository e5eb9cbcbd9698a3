"""`samtone_jax.export`: a checkpoint as a sentence-transformers directory (PyTorch) and back.

For tiny SDE, ADE and ADE-SPL models (every weight random) saved as orbax checkpoints with a run's
config.gin and metrics.jsonl, the export must give, in sentence-transformers (torch), the query and
document embeddings of our encoder to 1e-4 on the demo vocabulary, and `hf_import` must read it
back to the same parameters. Bad input is refused before anything is written.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import seqio

from samtone_jax import checkpoints
from samtone_jax import export as export_entry
from samtone_jax import exporting
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import runner
from samtone_jax.models import hf_import
from samtone_jax.models.config import DualEncoderConfig, T5Config
from samtone_jax.models.dual_encoder import DualEncoder
from samtone_jax.tasks import vocab

pytestmark = pytest.mark.usefixtures("fast_compile")

REPO = pathlib.Path(__file__).resolve().parents[1]
LENGTHS = {"queries": 8, "passages": 16}
STEP = 7
TEXTS = ["list directory contents", "copy files and directories, recursively if asked to",
         "   display the manual  pages of a command, with a  long description that is cut",
         "grep: print lines that match patterns in files; ÄÖ café", ""]


def _config(tower_sharing: str, pooling: str = "mean",
            scan_layers: bool = False) -> DualEncoderConfig:
  # vocab_size covers the demo vocabulary's 8000 pieces.
  encoder = T5Config(vocab_size=8000, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     dropout_rate=0.0, scan_layers=scan_layers)
  return DualEncoderConfig(encoder=encoder, tower_sharing=tower_sharing, pooling=pooling,
                           projection_dim=16)


def _random_params(config: DualEncoderConfig, seed: int) -> dict:
  """Initialised params with every leaf perturbed (layer norms and position biases matter)."""
  tokens = np.ones((1, 4), np.int32)
  params = nn.unbox(DualEncoder(config).init(jax.random.PRNGKey(seed), tokens, tokens)["params"])
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      np.asarray(x, np.float32) + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
      for x in leaves])


def _write_run(run_dir: pathlib.Path, params: dict, metrics: dict[str, float]) -> None:
  """A run directory as trainer.train leaves it: checkpoints/<STEP>, config.gin, metrics.jsonl."""
  manager = checkpoints.create_manager(str(run_dir))
  checkpoints.save(manager, STEP, {"params": {"model": jax.device_put(params)}}, {"step": STEP})
  manager.close()
  (run_dir / "config.gin").write_text("# the run's config\nTRAIN_STEPS = 7\n")
  with open(run_dir / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"kind": "train", "step": STEP, "loss": 1.0}) + "\n")
    f.write(json.dumps({"kind": "eval", "step": 3, **{k: 0.0 for k in metrics}}) + "\n")
    f.write(json.dumps({"kind": "eval", "step": STEP, **metrics}) + "\n")


def _ours(config, params, texts, side, length) -> np.ndarray:
  tokens = encoding.tokenize(texts, vocab.demo_vocabulary(), length)
  method = DualEncoder.encode_queries if side == "query" else DualEncoder.encode_documents
  return np.asarray(DualEncoder(config).apply({"params": params}, tokens, method=method))


# ADE-SPL with scanned layers (exported unrolled, imported stacked); ADE-FTE shares its embedder.
@pytest.mark.parametrize("tower_sharing,pooling,scan_layers", [
    ("sde", "mean", False), ("ade", "first", False), ("ade_spl", "mean", True),
    ("ade_fte", "mean", False)])
def test_sentence_transformers_round_trip(tmp_path, tower_sharing, pooling, scan_layers):
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  config = _config(tower_sharing, pooling, scan_layers)
  params = _random_params(config, seed=len(tower_sharing))
  metrics = {"demo_manpages_test/mrr@10": 0.25, "demo_manpages_test/ndcg@10": 0.5}
  _write_run(tmp_path / "run", params, metrics)

  export_dir = tmp_path / "export"
  export_entry.export(checkpoint_path=str(tmp_path / "run"), model=config,
                      export_dir=str(export_dir), task="demo_manpages",
                      feature_lengths=LENGTHS)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # No staging left.

  model = sentence_transformers.SentenceTransformer(str(export_dir), device="cpu")
  got = {"query": model.encode_query(TEXTS, convert_to_numpy=True),
         "document": model.encode_document(TEXTS, convert_to_numpy=True)}
  for side in ("query", "document"):
    # SDE is one model, so queries are cut to the longer (document) length too.
    length = LENGTHS["queries" if side == "query" and tower_sharing != "sde" else "passages"]
    want = _ours(config, params, TEXTS, side, length)
    np.testing.assert_allclose(got[side], want, atol=1e-4, rtol=0)
  if tower_sharing != "sde":  # The towers really differ, so the routing is tested.
    assert np.abs(got["query"] - got["document"]).max() > 1e-2

  if scan_layers:
    imported_config, imported = hf_import.import_sentence_transformers(export_dir, config=config)
  else:
    imported_config, imported = hf_import.import_sentence_transformers(
        export_dir, tower_sharing=tower_sharing)
  assert imported_config == config
  assert jax.tree.structure(imported) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, imported, params)

  card = (export_dir / "README.md").read_text()
  assert f"training step {STEP}" in card
  assert "| demo_manpages_test/mrr@10 | 0.2500 |" in card
  assert "TRAIN_STEPS = 7" in card


def test_bad_input_is_refused_and_nothing_written(tmp_path, monkeypatch):
  config = _config("sde")
  common = dict(model=config, task="demo_manpages", feature_lengths=LENGTHS)
  with pytest.raises(FileNotFoundError, match="No samtone_jax or t5x checkpoint"):
    export_entry.export(checkpoint_path=str(tmp_path / "missing"),
                        export_dir=str(tmp_path / "out"), **common)
  assert sorted(os.listdir(tmp_path)) == []

  # A legacy t5x model directory (MODEL_DIR/checkpoint_<step>/checkpoint, msgpack): named as
  # such, for every command (they all load through evaluation.runner.load_model). t5x's current
  # orbax checkpoints are read: tests/test_t5x.py.
  t5x_run = tmp_path / "t5x_run"
  (t5x_run / "checkpoint_100").mkdir(parents=True)
  (t5x_run / "checkpoint_100" / "checkpoint").write_bytes(b"\x82")
  for path in (t5x_run, t5x_run / "checkpoint_100"):
    with pytest.raises(checkpoints.UnsupportedCheckpointError, match="t5x checkpoint in t5x's legacy msgpack format"):
      export_entry.export(checkpoint_path=str(path), export_dir=str(tmp_path / "out"), **common)
    with pytest.raises(checkpoints.UnsupportedCheckpointError, match="t5x checkpoint in t5x's legacy msgpack format"):
      runner.load_model(str(path), config)
  assert sorted(os.listdir(tmp_path)) == ["t5x_run"]

  params = _random_params(config, seed=0)
  _write_run(tmp_path / "run", params, {})
  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "keep.txt").write_text("mine")
  with pytest.raises(exporting.ExportError, match="not empty.*EXPORT_OVERWRITE=True"):
    export_entry.export(checkpoint_path=str(tmp_path / "run"), export_dir=str(occupied),
                        **common)
  assert os.listdir(occupied) == ["keep.txt"]
  # A remote EXPORT_DIR (exporters write local files) or a file: refused before anything is read.
  with pytest.raises(exporting.ExportError, match="exports are written to local disk.*gsutil"):
    export_entry.export(checkpoint_path=str(tmp_path / "run"), export_dir="gs://bucket/export",
                        **common)
  (occupied / "keep.txt").rename(tmp_path / "a_file")
  try:
    with pytest.raises(exporting.ExportError, match="a_file' is a file, not a directory"):
      export_entry.export(checkpoint_path=str(tmp_path / "run"),
                          export_dir=str(tmp_path / "a_file"), **common)
  finally:
    (tmp_path / "a_file").rename(occupied / "keep.txt")

  # An encoder-decoder (SKILL) task: inputs/targets, no dual encoder to export.
  with pytest.raises(exporting.ExportError, match="'demo_wordnet_qa' has the features .*'inputs'"
                     ".*not a dual encoder's queries/passages"):
    export_entry.export(checkpoint_path=str(tmp_path / "run"), model=config,
                        task="demo_wordnet_qa", feature_lengths=LENGTHS,
                        export_dir=str(tmp_path / "o"))
  # sentence-transformers 5 / transformers 4 lack the module layout the writer uses: refused
  # before the checkpoint is read (this one does not exist).
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  for module, old_version, name in ((sentence_transformers, "5.1.0", "sentence-transformers >= 6"),
                                    (transformers, "4.57.1", "transformers >= 5")):
    with monkeypatch.context() as patch:
      patch.setattr(module, "__version__", old_version)
      with pytest.raises(exporting.ExportError, match=f"{name} \\(installed: {old_version}"):
        export_entry.export(checkpoint_path=str(tmp_path / "missing"),
                            export_dir=str(tmp_path / "o"), **common)
  assert not (tmp_path / "o").exists()

  # A vocabulary that no exported tokenizer can express.
  with pytest.raises(exporting.ExportError, match="task 'bytes' uses a ByteVocabulary"):
    exporting.sentencepiece_model_of(seqio.ByteVocabulary(), "bytes")
  with pytest.raises(exporting.ExportError, match="EXPORT_FORMAT='onnx'"):
    export_entry.export(checkpoint_path=str(tmp_path / "run"), export_dir=str(tmp_path / "o"),
                        export_format="onnx", **common)

  # A failure while writing leaves neither the target nor a staging directory.
  from samtone_jax.exporting import sentence_transformers_dir  # pylint: disable=g-import-not-at-top
  def fail(directory, *args):
    (directory / "half.bin").write_text("x")
    raise RuntimeError("disk full")
  monkeypatch.setattr(sentence_transformers_dir, "write", fail)
  with pytest.raises(RuntimeError, match="disk full"):
    export_entry.export(checkpoint_path=str(tmp_path / "run"), export_dir=str(occupied),
                        overwrite=True, **common)
  assert os.listdir(occupied) == ["keep.txt"]
  assert sorted(os.listdir(tmp_path)) == ["occupied", "run", "t5x_run"]


@pytest.mark.parametrize("case,experiment,message", [
    ("occupied", "demo_samtone", "Export failed: EXPORT_DIR="),
    ("missing_checkpoint", "demo_samtone", "Error: No samtone_jax or t5x checkpoint under"),
    ("encoder_decoder", "skill_wordnet_demo", "Export failed: MIXTURE_OR_TASK_NAME="),
], ids=["occupied", "missing_checkpoint", "encoder_decoder"])
def test_command_exits_1_with_message(tmp_path, case, experiment, message):
  """The command line: a non-empty EXPORT_DIR (message names EXPORT_OVERWRITE=True), a checkpoint
  that does not exist, or an encoder-decoder experiment: exit status 1, one message without a
  traceback, and nothing written."""
  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "keep.txt").write_text("mine")
  export_dir = occupied if case == "occupied" else tmp_path / "export"
  result = subprocess.run(
      [sys.executable, "-m", "samtone_jax.export", f"--gin_file=experiments/{experiment}.gin",
       f'--gin.CHECKPOINT_PATH="{tmp_path / "run"}"', f'--gin.EXPORT_DIR="{export_dir}"'],
      capture_output=True, text=True, cwd=tmp_path, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stderr[-2000:]
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
  if case == "occupied":
    assert "EXPORT_OVERWRITE=True" in result.stderr
  assert os.listdir(occupied) == ["keep.txt"]
  assert sorted(os.listdir(tmp_path)) == ["occupied"]  # no export, no staging directory


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_model_strings_to_embeddings(tmp_path, dtype, tower_sharing="ade_spl"):
  """`tf.saved_model.load(dir).signatures[...]` on strings equals our embeddings (1e-4), per
  tower (ADE-SPL: the towers differ; SDE is the same code with one tower). A model trained with
  bfloat16 activations (the TPU experiments) is exported computing in float32, like our float32
  encoder with its parameters, and its card says so."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_text  # pylint: disable=g-import-not-at-top,unused-import  (the tokenizer op)
  config = _config(tower_sharing)
  params = _random_params(config, seed=3)
  config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, dtype=dtype))
  _write_run(tmp_path / "run", params, {})
  export_dir = tmp_path / "saved_model"
  export_entry.export(checkpoint_path=str(tmp_path / "run"), model=config,
                      export_dir=str(export_dir), task="demo_manpages", feature_lengths=LENGTHS,
                      export_format="saved_model")
  loaded = tf.saved_model.load(str(export_dir))
  assert {"encode_queries", "encode_documents", "serving_default"} <= set(loaded.signatures)
  for name, side, length in (("encode_queries", "query", LENGTHS["queries"]),
                             ("encode_documents", "document", LENGTHS["passages"])):
    got = loaded.signatures[name](tf.constant(TEXTS))["embeddings"].numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _ours(_config(tower_sharing), params, TEXTS, side, length),
                               atol=1e-4, rtol=0)
  card = (export_dir / "README.md").read_text()
  assert "encode_queries" in card
  assert ("activations were bfloat16 in samtone_jax; the export computes in float32" in card) == (
      dtype == "bfloat16")


def _bits(tree) -> list[tuple[str, np.ndarray]]:
  """(path, float32 bit pattern as uint32) of every leaf: equality to the bit, -0.0 and NaN too."""
  return [(jax.tree_util.keystr(path), np.asarray(leaf, np.float32).view(np.uint32))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _assert_same_bits(got, want) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), (_, b) in zip(_bits(got), _bits(want)):
    np.testing.assert_array_equal(a, b, err_msg=path)


@pytest.mark.parametrize("source,tower_sharing,scan_layers", [
    ("run", "ade_spl", True),   # our checkpoint, stored stacked; the t5x model is stacked too
    ("gtr", "sde", False),      # a sentence-transformers GTR-layout directory
    ("hf_t5", "sde", False),    # a Hugging Face T5 encoder directory (no projection)
])
def test_t5x_checkpoint_holds_the_source_params_to_the_bit(tmp_path, source, tower_sharing,
                                                           scan_layers):
  """EXPORT_FORMAT="t5x": our run or GTR-layout weights become EXPORT_DIR/checkpoint_0/state in
  t5x's orbax layout ({"target": {"model": params}, "state": {"step": 0}}, OCDBT), read here with
  orbax alone; tests/test_t5x.py restores it in `python -m t5x.train`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = _config(tower_sharing, scan_layers=scan_layers)
  params = _random_params(config, seed=3)
  if source == "run":
    checkpoint_path = tmp_path / "run"
    _write_run(checkpoint_path, params, {"demo_manpages_test/mrr@10": 0.25})
  elif source == "hf_t5":  # config.json + model.safetensors of the encoder only.
    from samtone_jax.exporting import sentence_transformers_dir  # pylint: disable=g-import-not-at-top
    from samtone_jax.models import hf_export  # pylint: disable=g-import-not-at-top
    checkpoint_path = tmp_path / "hf_t5"
    encoder_params, _ = hf_export.tower_params(config, params, "query")
    sentence_transformers_dir.write_t5_encoder(checkpoint_path, config.encoder, encoder_params)
    # The projection is not in the directory: our loader initialises it (seed 0), like
    # INITIAL_CHECKPOINT_PATH does; that is the source the t5x checkpoint must hold.
    params = jax.device_get(runner.load_model(str(checkpoint_path), config).params["model"])
    assert not np.array_equal(params["projection"]["kernel"],
                              _random_params(config, seed=3)["projection"]["kernel"])
    _assert_same_bits({k: v for k, v in params.items() if k != "projection"},
                      {k: v for k, v in _random_params(config, seed=3).items()
                       if k != "projection"})
  else:  # GTR layout, written by our sentence-transformers exporter from the same params.
    checkpoint_path = tmp_path / "gtr"
    exporting.export_model(config, params, step_dir=str(tmp_path / "none"),
                           sentencepiece_model=vocab.demo_vocabulary().sp_model,
                           max_seq_lengths=LENGTHS, export_dir=str(checkpoint_path))
    assert (checkpoint_path / "modules.json").exists()

  export_dir = tmp_path / "t5x"
  path = export_entry.export(checkpoint_path=str(checkpoint_path), model=config,
                             export_dir=str(export_dir), task="no_task_needed_for_t5x",
                             feature_lengths=LENGTHS, export_format="t5x")
  assert path == str(export_dir)
  assert sorted(os.listdir(export_dir)) == ["README.md", "checkpoint_0"]
  state_dir = export_dir / "checkpoint_0" / "state"
  assert (state_dir / "manifest.ocdbt").exists()  # t5x writes OCDBT (use_ocdbt=True)

  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(str(state_dir)).item_metadata.tree
  assert sorted(tree) == ["state", "target"] and sorted(tree["state"]) == ["step"]
  assert sorted(tree["target"]) == ["model"]
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                              is_leaf=lambda x: hasattr(x, "shape"))
  restored = checkpointer.restore(str(state_dir), restore_args=restore_args)
  assert int(restored["state"]["step"]) == 0
  _assert_same_bits(restored["target"]["model"], params)

  # Our own readers take it back (as a t5x checkpoint), to the bit.
  loaded = runner.load_model(str(export_dir), config)
  assert loaded.step_dir == str(export_dir / "checkpoint_0")
  _assert_same_bits(jax.device_get(loaded.params["model"]), params)

  card = (export_dir / "README.md").read_text()
  assert "gin/t5x/initial_checkpoint.gin" in card and f"{export_dir}/checkpoint_0" in card
  if source == "run":
    assert f"training step {STEP}" in card and "| demo_manpages_test/mrr@10 | 0.2500 |" in card
  else:
    assert str(checkpoint_path) in card and "training step" not in card
