"""BEIR-layout directories (plain and .gz): eval sets and the train task."""

import collections

import pytest
import seqio

from fixtures import tasks_data
from samtone_jax.tasks import beir
from samtone_jax.tasks import eval_sets
from samtone_jax.tasks import pipeline
from samtone_jax.tasks import vocab


@pytest.mark.parametrize("gz", [False, True])
def test_beir_directory_eval_sets_and_train_task(tmp_path, gz):
  tasks_data.write_beir(str(tmp_path), gz=gz)
  names = beir.register_beir_dataset("fixture", str(tmp_path), vocabulary=vocab.demo_vocabulary())
  assert names == ["beir_fixture_test", "beir_fixture_train", "beir_fixture_train"]
  es = eval_sets.get_eval_set("beir_fixture_test")
  assert es.protocol == "beir" and es.vocabulary.vocab_size == vocab.DEMO_VOCAB_SIZE
  assert es.corpus == {
      "d1": "Aspirin Aspirin reduces the risk of heart attack.",
      "d2": "Vitamin D is made in the skin under sunlight.",
      "d3": "Sleep Adults need seven to nine hours of sleep.",
      "d4": "Coffee Caffeine blocks adenosine receptors."}
  assert es.queries == {"q1": "does aspirin prevent heart attacks",
                        "q2": "how is vitamin d produced"}
  assert es.qrels == {"q1": {"d1": 2}, "q2": {"d2": 1, "d4": 0}}

  sp = tasks_data.sp_processor()
  batches = list(pipeline.get_train_iterator("beir_fixture_train", {"queries": 8, "passages": 12},
                                             1, seed=0, shard_info=seqio.ShardInfo(0, 1),
                                             num_epochs=1))
  got = collections.Counter((tuple(b["queries"][0]), tuple(b["passages"][0])) for b in batches)
  expected_pairs = [("does aspirin prevent heart attacks", es.corpus["d1"]),
                    ("how much sleep do adults need", es.corpus["d3"])]  # score > 0 only
  assert got == collections.Counter(
      (tuple(tasks_data.expected_ids(sp, q, 8)), tuple(tasks_data.expected_ids(sp, d, 12)))
      for q, d in expected_pairs)


def test_register_beir_directories_and_test_only_dataset(tmp_path):
  tasks_data.write_beir(str(tmp_path / "sci-fact"), splits=("test",))
  (tmp_path / "not_beir").mkdir()
  names = beir.register_beir_directories(str(tmp_path), vocabulary=vocab.demo_vocabulary())
  assert names == ["beir_sci_fact_test"]  # no train qrels: no train task
  assert "beir_sci_fact_train" not in seqio.TaskRegistry.names()
  assert len(eval_sets.get_eval_set("beir_sci_fact_test").corpus) == 4
