"""MS MARCO passage: training triples (text and id forms, .gz), TFDS beir/msmarco, dev eval set."""

import collections

import pytest
import seqio
import tensorflow_datasets as tfds

from fixtures import tasks_data
from samtone_jax.tasks import msmarco
from samtone_jax.tasks import pipeline
from samtone_jax.tasks import vocab

LQ, LP = 8, 16


def _one_epoch(name):
  batches = list(pipeline.get_train_iterator(name, {"queries": LQ, "passages": LP}, 1, seed=0,
                                             shard_info=seqio.ShardInfo(0, 1), num_epochs=1))
  return collections.Counter(
      (tuple(b["queries"][0]), tuple(b["passages"][0]),
       tuple(tuple(n) for n in b["negatives"][0]) if "negatives" in b else None)
      for b in batches)


def _expected_triples(sp):
  return collections.Counter(
      (tuple(tasks_data.expected_ids(sp, q, LQ)), tuple(tasks_data.expected_ids(sp, p, LP)),
       (tuple(tasks_data.expected_ids(sp, n, LP)),))
      for q, p, n in tasks_data.msmarco_text_triples())


@pytest.mark.parametrize("text_triples,gz", [(True, False), (False, False), (False, True)])
def test_train_task_exact_tokens_with_hard_negative(tmp_path, text_triples, gz):
  tasks_data.write_msmarco(str(tmp_path), text_triples=text_triples, id_triples=True, gz=gz)
  msmarco.register(str(tmp_path), vocabulary=vocab.demo_vocabulary())
  got = _one_epoch(msmarco.TRAIN_TASK)
  assert got == _expected_triples(tasks_data.sp_processor())
  assert sum(got.values()) == len(tasks_data.MSMARCO_ID_TRIPLES)


def test_dev_eval_set(tmp_path):
  tasks_data.write_msmarco(str(tmp_path))
  msmarco.register(str(tmp_path), vocabulary=vocab.demo_vocabulary())
  es = msmarco.dev_eval_set(str(tmp_path), vocab.demo_vocabulary())
  assert es.name == "msmarco_passage_dev_small" and es.protocol == "msmarco"
  assert es.queries == {str(q): t for q, t in tasks_data.MSMARCO_DEV_QUERIES.items()}
  assert es.corpus == {str(p): t for p, t in tasks_data.MSMARCO_COLLECTION.items()}
  assert es.qrels == {"1048585": {"1": 1}, "2": {"4": 1, "0": 1}}


def test_train_queries_as_a_set_to_mine_from(tmp_path):
  tasks_data.write_msmarco(str(tmp_path))
  msmarco.register(str(tmp_path), vocabulary=vocab.demo_vocabulary())
  from samtone_jax.tasks import eval_sets  # pylint: disable=g-import-not-at-top
  es = eval_sets.get_eval_set(msmarco.TRAIN_EVAL_SET)
  assert es.name == "msmarco_passage_train"
  assert es.queries == {str(q): t for q, t in tasks_data.MSMARCO_TRAIN_QUERIES.items()}
  assert es.corpus == {str(p): t for p, t in tasks_data.MSMARCO_COLLECTION.items()}
  assert es.qrels == {str(q): {str(p): 1} for q, p in tasks_data.MSMARCO_TRAIN_QRELS.items()}


def test_paths_configuration_is_read_lazily(tmp_path, monkeypatch):
  from samtone_jax.tasks import paths  # pylint: disable=g-import-not-at-top
  tasks_data.write_msmarco(str(tmp_path / "msmarco"))
  monkeypatch.setenv("SAMTONE_DATA_DIR", str(tmp_path / "elsewhere"))
  msmarco.register(vocabulary=vocab.demo_vocabulary())  # no directory: resolved on use
  with pytest.raises(FileNotFoundError, match="elsewhere/msmarco/triples.train.small.tsv"):
    next(iter(msmarco.train_triples()))
  paths.configure_data_dirs(data_dir=str(tmp_path))
  try:
    assert _one_epoch(msmarco.TRAIN_TASK) == _expected_triples(tasks_data.sp_processor())
  finally:
    paths.reset_data_dirs()


def test_tfds_beir_msmarco_train_task():
  """Real TFDS reading path (beir/msmarco builder, data from tfds.testing.mock_data)."""
  msmarco.register(vocabulary=vocab.demo_vocabulary())
  sp = tasks_data.sp_processor()
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    pairs = [(ex["query"].decode(), ex["passage"].decode())
             for ex in tfds.as_numpy(tfds.builder("beir/msmarco").as_dataset(
                 split="train", shuffle_files=False)) if ex["score"] > 0]
    got = _one_epoch(msmarco.TRAIN_TASK_TFDS)
  assert len(pairs) == 6
  assert got == collections.Counter(
      (tuple(tasks_data.expected_ids(sp, q, LQ)), tuple(tasks_data.expected_ids(sp, p, LP)), None)
      for q, p in pairs)
