"""Evaluation in bounded memory: shards on disk, bfloat16 storage, 2 processes, offset corpus.

Every variant is checked against one reference written here from the definition: the in-memory
float32 embeddings of a tiny real DualEncoder, scored with numpy in float64 and ranked by (score
descending, corpus position ascending) — the order `search.exact_search` documents. The corpus is
an MS MARCO collection.tsv read through `msmarco.Collection` (an offset index), so the eval path a
full-size run takes is the one tested.

bfloat16 tolerance: rounding to bfloat16 changes each component by at most 2^-9 relative
(round-to-nearest, 8 significant bits), so a score of unit-norm embeddings moves by at most
2^-9 <= 2^-8. A bfloat16 run must equal the reference computed from the same rounded rows exactly
(ids and ranks), and the float32 run up to that tolerance: scores within 2^-8, and only documents
whose float32 scores are within 2 * 2^-8 of each other may change places (one does here).
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import seqio

from samtone_jax import errors
from samtone_jax import partitioning
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import retrieval
from samtone_jax.evaluation import search
from samtone_jax.models.config import DualEncoderConfig, T5Config
from samtone_jax.models.dual_encoder import DualEncoder
from samtone_jax.tasks import msmarco

import test_multihost  # pylint: disable=g-bad-import-order  (the 2-process harness)

pytestmark = pytest.mark.usefixtures("fast_compile")

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()
NUM_PASSAGES, NUM_QUERIES, K = 29, 6, 10
BF16_SCORE_TOLERANCE = 2.0**-8


def write_msmarco(directory, seed=0):
  """collection.tsv (pids 0..n-1, as the official file), dev queries and qrels."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "collection.tsv"), "w") as f:
    for pid in range(NUM_PASSAGES):
      f.write(f"{pid}\t{' '.join(rng.choice(WORDS, size=rng.integers(3, 20)))}\n")
  with open(os.path.join(directory, "queries.dev.small.tsv"), "w") as f:
    for qid in range(NUM_QUERIES):
      f.write(f"{1000 + qid}\t{' '.join(rng.choice(WORDS, size=4))}\n")
  with open(os.path.join(directory, "qrels.dev.small.tsv"), "w") as f:
    for qid in range(NUM_QUERIES):
      f.write(f"{1000 + qid}\t0\t{rng.integers(NUM_PASSAGES)}\t1\n")


def tiny_model_and_eval_set(directory):
  """The tiny ADE model on a (data=all devices) mesh, and the dev set at lengths 8 / 16.

  Used in this process and, verbatim, in the two-process script: seed 0, so every process and
  every host count builds the same parameters.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  config = DualEncoderConfig(
      encoder=T5Config(vocab_size=260, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                       dropout_rate=0.0),
      tower_sharing="ade", projection_dim=8, identical_tower_init=False)
  model = DualEncoder(config)
  mesh = partitioning.create_mesh(-1, 1)
  tokens = jnp.ones((8, 8), jnp.int32)
  params, _ = partitioning.sharded_init(lambda rng: model.init(rng, tokens, tokens), mesh,
                                        jax.random.key(0))
  query_fn, document_fn = encoding.dual_encoder_encode_fns(model, params["params"], mesh)
  eval_set = dataclasses.replace(msmarco.dev_eval_set(directory, seqio.ByteVocabulary()),
                                 query_length=8, document_length=16)
  return mesh, query_fn, document_fn, eval_set


SEARCH = dict(k=K, batch_size=8, chunk_size=4, shard_size=5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("msmarco"))
  write_msmarco(directory)
  mesh, query_fn, document_fn, eval_set = tiny_model_and_eval_set(directory)
  query_ids = list(eval_set.qrels)
  queries = encoding.encode_texts([eval_set.queries[q] for q in query_ids], query_fn,
                                  eval_set.vocabulary, 8, batch_size=8, mesh=mesh)
  documents = encoding.encode_texts([eval_set.corpus[str(p)] for p in range(NUM_PASSAGES)],
                                    document_fn, eval_set.vocabulary, 16, batch_size=8, mesh=mesh)
  return dict(directory=directory, mesh=mesh, query_fn=query_fn, document_fn=document_fn,
              eval_set=eval_set, query_ids=query_ids, queries=queries, documents=documents)


def reference_run(query_ids, queries, documents, k=K):
  """{qid: [(pid, score), ...]} by float64 numpy scores, (score desc, position asc)."""
  scores = queries.astype(np.float64) @ documents.astype(np.float64).T
  run = {}
  for row, query_id in enumerate(query_ids):
    order = np.lexsort((np.arange(scores.shape[1]), -scores[row]))[:k]
    run[query_id] = [(str(p), float(scores[row, p])) for p in order]
  return run


def ranked(run):
  """{qid: [doc ids in rank order]} of a {qid: {doc: score}} run (dict order is rank order)."""
  return {q: list(docs) for q, docs in run.items()}


def assert_same_run(run, reference, atol):
  assert ranked(run) == {q: [d for d, _ in docs] for q, docs in reference.items()}
  for q, docs in reference.items():
    np.testing.assert_allclose([run[q][d] for d, _ in docs], [s for _, s in docs], atol=atol)


def assert_bf16_run_within_tolerance(run, query_ids, queries, documents):
  """A bfloat16 run ranks as the float32 scores do, except that documents whose float32 scores
  differ by at most twice the bfloat16 tolerance may swap; its scores are within the tolerance."""
  scores = queries.astype(np.float64) @ documents.astype(np.float64).T
  for row, query_id in enumerate(query_ids):
    retrieved = [int(d) for d in run[query_id]]
    exact = scores[row, retrieved]
    np.testing.assert_allclose(list(run[query_id].values()), exact, atol=BF16_SCORE_TOLERANCE)
    for i in range(len(exact)):  # no document ranked above one better by more than 2 tol
      assert np.all(exact[i + 1:] <= exact[i] + 2 * BF16_SCORE_TOLERANCE)
    kth = np.sort(scores[row])[::-1][len(retrieved) - 1]  # nothing missed by more than 2 tol
    missed = np.setdiff1d(np.arange(scores.shape[1]), retrieved)
    assert np.all(scores[row, missed] <= kth + 2 * BF16_SCORE_TOLERANCE)


def test_memory_disk_and_ram_in_float32_and_bfloat16_equal_the_reference(setup, tmp_path):
  s = setup
  assert isinstance(s["eval_set"].corpus, msmarco.Collection)
  reference = reference_run(s["query_ids"], s["queries"], s["documents"])
  rounded = s["documents"].astype(ml_dtypes.bfloat16).astype(np.float32)
  reference_bf16 = reference_run(s["query_ids"], s["queries"], rounded)
  args = (s["eval_set"], s["query_fn"], s["document_fn"])
  runs = {
      "memory": retrieval.retrieve(*args, mesh=s["mesh"], **SEARCH),
      "disk": retrieval.retrieve(*args, mesh=s["mesh"], embeddings_dir=str(tmp_path / "f32"),
                                 **SEARCH),
      "memory_bf16": retrieval.retrieve(*args, mesh=s["mesh"], embedding_dtype="bfloat16",
                                        **SEARCH),
      "disk_bf16": retrieval.retrieve(*args, mesh=s["mesh"], embedding_dtype="bfloat16",
                                      embeddings_dir=str(tmp_path / "bf16"), **SEARCH),
      "ram_bf16": retrieval.retrieve(*args, mesh=s["mesh"], embedding_dtype="bfloat16",
                                     embeddings_dir="ram://i19eval/bf16", **SEARCH),
  }
  for name in ("memory", "disk"):
    assert_same_run(runs[name], reference, atol=1e-5)
  for name in ("memory_bf16", "disk_bf16", "ram_bf16"):
    assert_same_run(runs[name], reference_bf16, atol=1e-5)  # the rounded rows, float32 sums
    assert_bf16_run_within_tolerance(runs[name], s["query_ids"], s["queries"], s["documents"])
  assert runs["ram_bf16"] == runs["disk_bf16"]

  # The shards: 29 rows in shards of 5, bfloat16 stored as uint16, half the bytes of float32.
  with open(tmp_path / "bf16" / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["dtype"] == "bfloat16" and manifest["shard_sizes"] == [5] * 5 + [4]
  ids, shards = encoding.load_embedding_shards(str(tmp_path / "bf16"))
  assert ids == [str(p) for p in range(NUM_PASSAGES)]
  assert all(shard.dtype == ml_dtypes.bfloat16 and isinstance(shard, np.memmap)
             for shard in shards)
  np.testing.assert_array_equal(np.concatenate(shards).astype(np.float32), rounded)
  f32_bytes = os.path.getsize(tmp_path / "f32" / "embeddings-00000.npy")
  bf16_bytes = os.path.getsize(tmp_path / "bf16" / "embeddings-00000.npy")
  assert bf16_bytes - 128 == (f32_bytes - 128) // 2  # 128-byte .npy headers


def test_merge_top_k_equals_one_search_over_all_rows():
  rng = np.random.default_rng(1)
  queries = rng.normal(size=(7, 4)).astype(np.float32)
  corpus = np.round(rng.normal(size=(23, 4)), 1).astype(np.float32)  # rounded: tied scores
  corpus[11] = corpus[3]  # an exact tie across the two parts
  whole = search.exact_search(queries, corpus, 30)
  parts = [search.exact_search(queries, corpus[:12], 30),
           search.exact_search(queries, corpus[12:], 30)]
  scores = np.stack([parts[0][0], parts[1][0]])
  indices = np.stack([parts[0][1], np.where(parts[1][1] >= 0, parts[1][1] + 12, -1)])
  merged = search.merge_top_k(scores, indices, 30)
  np.testing.assert_array_equal(merged[1], whole[1])
  np.testing.assert_array_equal(merged[0], whole[0])


# Two processes x 4 CPU devices: each encodes its half of the corpus, writes its own shards and
# searches them; prints the runs (process 0) for comparison with this process's reference.
TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    from samtone_jax import distributed
    distributed.initialize(coordinator_address=sys.argv[1], process_count=int(sys.argv[2]),
                           process_index=int(sys.argv[3]))
    import jax
    jax.config.update("jax_disable_most_optimizations", True)  # as the test module's processes
    sys.path.insert(0, sys.argv[5])
    import test_eval_scale as t
    from samtone_jax.evaluation import retrieval
    mesh, query_fn, document_fn, eval_set = t.tiny_model_and_eval_set(sys.argv[4])
    out = sys.argv[6]
    runs = {
        "memory": retrieval.retrieve(eval_set, query_fn, document_fn, mesh=mesh, **t.SEARCH),
        "disk_bf16": retrieval.retrieve(eval_set, query_fn, document_fn, mesh=mesh,
                                        embedding_dtype="bfloat16",
                                        embeddings_dir=out + "/bf16", **t.SEARCH),
        # A directory local to each host (here: one per process): each reads only its shards.
        "host_local": retrieval.retrieve(eval_set, query_fn, document_fn, mesh=mesh,
                                         embeddings_dir=f"{out}/host{jax.process_index()}",
                                         **t.SEARCH),
    }
    if jax.process_index() == 0:
      print("RUNS " + json.dumps({k: list(v.items()) for k, v in runs.items()}))
""")


def test_two_processes_each_encode_half_and_give_the_one_process_run(setup, tmp_path):
  s = setup
  script = tmp_path / "two_process_eval.py"
  script.write_text(TWO_PROCESS_SCRIPT)
  port = test_multihost.free_port()
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  outputs = test_multihost.run_processes(
      [[sys.executable, str(script), f"localhost:{port}", "2", str(i), s["directory"], tests_dir,
        str(tmp_path)] for i in range(2)], num_devices=4, timeout=600)
  line = next(l for l in outputs[0].splitlines() if l.startswith("RUNS "))
  runs = {name: dict((q, dict(docs)) for q, docs in value)
          for name, value in json.loads(line[5:]).items()}
  reference = reference_run(s["query_ids"], s["queries"], s["documents"])
  rounded = s["documents"].astype(ml_dtypes.bfloat16).astype(np.float32)
  assert_same_run(runs["memory"], reference, atol=1e-5)
  assert_same_run(runs["host_local"], reference, atol=1e-5)
  assert sorted(os.listdir(tmp_path / "host1")) == [  # only process 1's half, and a manifest
      "embeddings-00003.npy", "embeddings-00004.npy", "embeddings-00005.npy", "ids-00003.json",
      "ids-00004.json", "ids-00005.json", "manifest.json"]
  assert_same_run(runs["disk_bf16"], reference_run(s["query_ids"], s["queries"], rounded),
                  atol=1e-5)
  assert_bf16_run_within_tolerance(runs["disk_bf16"], s["query_ids"], s["queries"],
                                   s["documents"])
  # Each process wrote the shards of its own half (rows 0..13 and 14..28, shards of <= 5).
  with open(tmp_path / "bf16" / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["process_count"] == 2
  assert manifest["shard_sizes"] == [5, 5, 4, 5, 5, 5]
  assert manifest["shard_processes"] == [0, 0, 0, 1, 1, 1]
  ids, shards = encoding.load_embedding_shards(str(tmp_path / "bf16"))
  assert ids == [str(p) for p in range(NUM_PASSAGES)]
  np.testing.assert_allclose(np.concatenate(shards).astype(np.float32), rounded, atol=1e-6)


def _damaged_shards(tmp_path, setup, damage):
  directory = tmp_path / "shards"
  eval_set = setup["eval_set"]
  ids = [str(p) for p in range(NUM_PASSAGES)]
  encoding.encode_to_shards(ids, eval_set.corpus.texts, setup["document_fn"],
                            eval_set.vocabulary, 16, str(directory), shard_size=10, batch_size=8,
                            mesh=setup["mesh"])
  path = directory / "embeddings-00001.npy"
  if damage == "missing":
    os.remove(path)
  else:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 20])
  return directory, path


@pytest.mark.parametrize("damage, message", [("missing", "is missing"),
                                             ("truncated", "is truncated")])
def test_missing_or_truncated_shard_names_the_file(setup, tmp_path, damage, message):
  directory, path = _damaged_shards(tmp_path, setup, damage)
  with pytest.raises(errors.EmbeddingShardError, match=f"{path}.*{message}"):
    encoding.load_embedding_shards(str(directory))
  # Through a command's error handling (samtone_jax.cli.run): one line, exit status 1.
  code = ("import sys; from samtone_jax import cli; from samtone_jax.evaluation import encoding\n"
          f"cli.run(lambda argv: encoding.load_embedding_shards({str(directory)!r}))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=test_multihost.subprocess_env(1), timeout=300, check=False)
  assert done.returncode == 1, done.stderr
  assert str(path) in done.stderr and message in done.stderr
  assert "Traceback" not in done.stderr


def test_collection_offset_index_reads_what_read_id_texts_reads(tmp_path):
  path = tmp_path / "collection.tsv"
  # Unordered, sparse pids (the index then searches a sorted copy), a CRLF line, extra spaces.
  path.write_bytes(b"7\tseven  \n3\tthree\r\n100\ta hundred\n0\tzero\n")
  collection = msmarco.Collection(str(path))
  expected = msmarco.read_id_texts(str(path), "pid")
  assert dict(collection) == {str(p): t for p, t in expected.items()}
  assert list(collection.ids) == ["7", "3", "100", "0"]
  assert collection.texts[1:3] == ["three", "a hundred"] and collection[100] == "a hundred"
  assert 3 in collection and "3" in collection and 4 not in collection and "x" not in collection
  assert pickle.loads(pickle.dumps(collection))["7"] == "seven"
  path.write_bytes(b"1\tone\n2\ttwo\n1\tagain\n")
  with pytest.raises(msmarco.readers.DataFormatError, match="collection.tsv, line 3: duplicate pid 1"):
    msmarco.Collection(str(path))


def test_corpus_texts_are_read_per_evaluation_and_freed_after_it(tmp_path):
  """Not cached for the life of the process (the issue found BEIR's lru_cache keeping train and
  test copies): each read of a set parses its files into new objects, and once an evaluation
  returns no object holding the corpus texts is alive. A held set is found by the same search,
  so the check is not vacuous."""
  import gc  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import beir  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import eval_sets  # pylint: disable=g-import-not-at-top
  root = tmp_path / "beir_freed"
  (root / "qrels").mkdir(parents=True)
  with open(root / "corpus.jsonl", "w") as f:
    for i in range(12):
      f.write(json.dumps({"_id": f"freed-d{i}", "title": "", "text": " ".join(WORDS[i:i + 4])})
              + "\n")
  with open(root / "queries.jsonl", "w") as f:
    f.write("".join(json.dumps({"_id": f"freed-q{i}", "text": WORDS[i]}) + "\n" for i in range(3)))
  with open(root / "qrels" / "test.tsv", "w") as f:
    f.write("query-id\tcorpus-id\tscore\n" + "".join(f"freed-q{i}\tfreed-d{i}\t1\n"
                                                      for i in range(3)))
  name = beir.register_beir_dataset("freed", str(root), vocabulary=seqio.ByteVocabulary())[0]

  def alive():
    gc.collect()
    return [o for o in gc.get_objects()
            if isinstance(o, (beir.BeirData, eval_sets.EvalSet)) and "freed-d0" in o.corpus]

  first, second = eval_sets.get_eval_set(name), eval_sets.get_eval_set(name)
  assert first.corpus == second.corpus and first.corpus is not second.corpus  # parsed twice
  assert len(alive()) == 2
  del first, second
  assert not alive()

  # Token ids mod 7 as a 4-d embedding: any deterministic encoder shows the lifetime.
  encode = lambda tokens: (np.asarray(tokens)[:, :4] % 7).astype(np.float32)
  results = retrieval.evaluate_eval_sets([name], encode, encode, k=5)
  assert set(results) == {f"{name}/ndcg@10", f"{name}/recall@100"}
  assert not alive()
