"""MultiReQA from MRQA .jsonl.gz + candidates.json.gz: sentence extraction, tasks, mixture."""

import collections
import gzip
import logging
from unittest import mock

import pytest
import seqio
import tensorflow_datasets as tfds

from fixtures import tasks_data
from samtone_jax.tasks import eval_sets
from samtone_jax.tasks import multireqa
from samtone_jax.tasks import paths
from samtone_jax.tasks import pipeline
from samtone_jax.tasks import vocab

NORMANS, PHOTO, _ = (c["context"] for c in tasks_data.MRQA_CONTEXTS)
S_NORMANDY = "The Normans were the people who gave their name to Normandy."
S_NORSE = "They descended from Norse raiders."
S_ROLLO = "Rollo was their first ruler."
S_CHLORO = "It takes place in the chloroplasts."


def _write_all(directory):
  for info in multireqa.DATASETS.values():
    if info.in_domain:
      tasks_data.write_mrqa(directory, info.file_name, "train")
      tasks_data.write_candidates(directory, info.file_name, "train")
    tasks_data.write_mrqa(directory, info.file_name, "dev")
    tasks_data.write_candidates(directory, info.file_name, "dev" if info.in_domain else "test")


def test_sentences_from_offsets_and_test_eval_sets(tmp_path, caplog):
  _write_all(str(tmp_path))
  multireqa.register(str(tmp_path), vocabulary=vocab.demo_vocabulary())
  with caplog.at_level(logging.WARNING):
    squad = eval_sets.get_eval_set("multireqa_squad_test")
  assert "skipped 1 MRQA contexts without MultiReQA sentences" in caplog.text
  assert squad.protocol == "multireqa"
  assert squad.corpus == {
      "SQuAD_n1/n2/n3/_0": S_NORMANDY, "SQuAD_n1/n2/n3/_1": S_NORSE,
      "SQuAD_n1/n2/n3/_2": S_ROLLO,
      "SQuAD_p1/p2/_0": "Photosynthesis converts light into chemical energy.",
      "SQuAD_p1/p2/_1": S_CHLORO, "SQuAD_p1/p2/_2": "Oxygen is released as a by-product."}
  assert squad.queries == {q: text for c in tasks_data.MRQA_CONTEXTS[:2] for q, text, _ in c["qas"]}
  assert squad.qrels == {"n1": {"SQuAD_n1/n2/n3/_0": 1}, "n2": {"SQuAD_n1/n2/n3/_2": 1},
                         "n3": {"SQuAD_n1/n2/n3/_1": 1}, "p1": {"SQuAD_p1/p2/_1": 1},
                         "p2": {"SQuAD_p1/p2/_1": 1}}
  # Out-of-domain sets read MultiReQA's data/test/<Name> with MRQA's dev file.
  bioasq = eval_sets.get_eval_set("multireqa_bioasq_test")
  assert bioasq.qrels["n2"] == {"BioASQ_n1/n2/n3/_2": 1}
  assert sorted(n for n in eval_sets.registered_eval_sets() if n.startswith("multireqa_")) == [
      f"multireqa_{d}_test" for d in sorted(multireqa.DATASETS)]


def test_train_task_exact_tokens_and_context_option(tmp_path):
  _write_all(str(tmp_path))
  sp = tasks_data.sp_processor()
  pairs = [("In what country is Normandy located?", S_NORMANDY, NORMANS),
           ("Who was the first ruler of the Normans?", S_ROLLO, NORMANS),
           ("Where did the Normans descend from?", S_NORSE, NORMANS),
           ("Where does photosynthesis happen?", S_CHLORO, PHOTO),
           ("Where does photosynthesis happen?", S_CHLORO, PHOTO)]
  for append_context in (False, True):
    multireqa.register(str(tmp_path), vocabulary=vocab.demo_vocabulary(),
                       append_context=append_context)
    batches = list(pipeline.get_train_iterator(
        "multireqa_triviaqa_train", {"queries": 8, "passages": 40}, 1, seed=0,
        shard_info=seqio.ShardInfo(0, 1), num_epochs=1))
    got = collections.Counter((tuple(b["queries"][0]), tuple(b["passages"][0])) for b in batches)
    expected = collections.Counter(
        (tuple(tasks_data.expected_ids(sp, q, 8)),
         tuple(tasks_data.expected_ids(sp, f"{s} {c}" if append_context else s, 40)))
        for q, s, c in pairs)
    assert got == expected
    # The repeated question and its shared answer get equal fingerprints.
    ids = collections.Counter(int(b["query_ids"][0]) for b in batches)
    assert sorted(ids.values()) == [1, 1, 1, 2]


def test_in_domain_mixture(tmp_path):
  _write_all(str(tmp_path))
  multireqa.register(str(tmp_path), vocabulary=vocab.demo_vocabulary())
  mixture = seqio.get_mixture_or_task(multireqa.IN_DOMAIN_MIXTURE)
  assert sorted(t.name for t in mixture.tasks) == sorted(
      f"multireqa_{d}_train" for d in ("searchqa", "triviaqa", "hotpotqa", "naturalquestions",
                                       "squad"))
  assert mixture.get_rate(seqio.get_mixture_or_task("multireqa_searchqa_train")) == 117_384
  it = pipeline.get_train_iterator(multireqa.IN_DOMAIN_MIXTURE, {"queries": 8, "passages": 16},
                                   4, seed=0, shard_info=seqio.ShardInfo(0, 1))
  batch = next(it)
  assert batch["queries"].shape == (4, 8) and batch["passages"].shape == (4, 16)


def test_tfds_mrqa_path_matches_jsonl_path(tmp_path):
  """TFDS mrqa/squad prepared by its real builder from the fixture files, read back by TFDS."""
  pytest.importorskip("importlib_resources", reason="TFDS's download_and_prepare imports it")
  _write_all(str(tmp_path))
  plain = {}
  for split, mrqa_split in (("train", "train"), ("validation", "dev")):
    with gzip.open(tmp_path / "mrqa" / mrqa_split / "SQuAD.jsonl.gz", "rb") as f:
      plain[split] = str(tmp_path / f"SQuAD.{split}.jsonl")  # TFDS downloads and gunzips
      with open(plain[split], "wb") as out:
        out.write(f.read())
  builder = tfds.builder("mrqa/squad", data_dir=str(tmp_path / "tfds"))
  # TFDS's own test approach: serve the builder local files instead of downloading.
  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         lambda self, urls: {k: plain[k] for k in urls}):
    builder.download_and_prepare()
  paths.configure_data_dirs(tfds_data_dir=str(tmp_path / "tfds"))
  try:
    from_tfds = multireqa.load("squad", "test", str(tmp_path), use_tfds=True)
    from_files = multireqa.load("squad", "test", str(tmp_path))
    assert from_tfds.sentences == from_files.sentences and len(from_files.sentences) == 6
    assert from_tfds.questions == from_files.questions and from_tfds.answers == from_files.answers
    train_tfds = multireqa.load("squad", "train", str(tmp_path), use_tfds=True)
    assert sorted(train_tfds.pairs) == sorted(multireqa.load("squad", "train", str(tmp_path)).pairs)
  finally:
    paths.reset_data_dirs()
