"""Hard-negative mining throughput: encode / search / filter, vs sentence-transformers.

Three measurements in one process on this machine's real CPU device (no fake devices):

  encode  the tiny demo dual encoder (gin/models/tiny.gin, SDE, random weights: speed does not
          depend on them) embedding man-page documents at the demo's lengths (64 / 16 tokens)
          through `encoding.encode_texts` (tokenisation included): documents/s and queries/s,
          measured on `--encode_docs` / `--encode_queries` texts and projected to the corpus.
  search  `mining.mine_embeddings`' exact top-k over `--num_docs` x `--num_queries` unit Gaussian
          float32 embeddings of dimension `--dim` (GTR's 768 by default; one positive per query,
          query i's positive is document i), k = range_max + 1.
  filter  `mining.select_negatives` on that search output (positives, rank window, top 8).

The peer is sentence-transformers' `mine_hard_negatives` on the same embeddings (written to its
cache folder, so it does no encoding), same range_max and num_negatives, "top" sampling, with its
torch matmul + top-k search (`use_faiss=False`) and with faiss (`use_faiss=True`, flat
inner-product index). Both return the 8 best non-positive documents of each query; the table gives
the fraction of queries whose negative lists are identical (differences are float32 near-ties).

Usage:
  JAX_PLATFORMS=cpu python benchmarks/mining.py [--num_docs 100000] [--num_queries 10000]
      [--dim 768] [--encode_docs 4096] [--encode_queries 4096] [--skip_faiss]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top

from samtone_jax.evaluation import mining  # pylint: disable=g-import-not-at-top
from search import unit_gaussian  # pylint: disable=g-import-not-at-top  (benchmarks/search.py)

RANGE_MAX = 64
NUM_NEGATIVES = 8


def measure_encode(num_docs: int, num_queries: int) -> tuple[float, float]:
  """(documents/s, queries/s) of the tiny demo dual encoder on man-page texts."""
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from samtone_jax import gin_config  # pylint: disable=g-import-not-at-top
  from samtone_jax import partitioning  # pylint: disable=g-import-not-at-top
  from samtone_jax.evaluation import encoding  # pylint: disable=g-import-not-at-top
  from samtone_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top
  from samtone_jax.models import dual_encoder  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import demo  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import eval_sets  # pylint: disable=g-import-not-at-top
  demo.register()
  data = eval_sets.get_eval_set(demo.TRAIN_EVAL_SET)
  gin_config.parse_gin(["experiments/demo_samtone.gin"], ['MODEL_DIR = "/tmp/unused"'])
  model_config = gin.get_configurable(config_lib.DualEncoderConfig)()
  gin.clear_config()
  model = dual_encoder.DualEncoder(model_config)
  mesh = partitioning.create_mesh(-1, 1)
  dummy = jnp.zeros((1, 8), jnp.int32)
  variables, _ = partitioning.sharded_init(
      lambda rng: model.init({"params": rng, "dropout": rng}, dummy, dummy), mesh,
      jax.random.PRNGKey(0))
  encode_queries, encode_documents = encoding.dual_encoder_encode_fns(
      model, variables["params"], mesh)
  documents = list(data.corpus.values())
  queries = list(data.queries.values())
  documents = (documents * (num_docs // len(documents) + 1))[:num_docs]
  queries = (queries * (num_queries // len(queries) + 1))[:num_queries]
  rates = []
  for texts, fn, length in ((documents, encode_documents, 64), (queries, encode_queries, 16)):
    encoding.encode_texts(texts[:256], fn, data.vocabulary, length, mesh=mesh)  # compile
    start = time.perf_counter()
    encoding.encode_texts(texts, fn, data.vocabulary, length, mesh=mesh)
    rates.append(len(texts) / (time.perf_counter() - start))
  return rates[0], rates[1]


def sentence_transformers_mine(queries: np.ndarray, corpus: np.ndarray, use_faiss: bool
                               ) -> tuple[float, list[list[int]]]:
  """Seconds and negative doc indices of sentence-transformers' mine_hard_negatives, fed our
  embeddings through its cache folder."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import datasets  # pylint: disable=g-import-not-at-top
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  from sentence_transformers.sentence_transformer.modules import StaticEmbedding  # pylint: disable=g-import-not-at-top
  from sentence_transformers.util import mine_hard_negatives  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, models as token_models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = Tokenizer(token_models.WordLevel({"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  model = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=corpus.shape[1])],
                              device="cpu")
  query_texts = [f"query {i}" for i in range(len(queries))]
  corpus_texts = [f"document {i}" for i in range(len(corpus))]
  # Its cache key (sentence-transformers 6.3): sha256 of repr((model name, prompt, prompt
  # name, deduplicated texts)); the positives are documents 0..Q-1, already in the corpus.
  model_name = model.model_card_data.base_model or ""
  with tempfile.TemporaryDirectory() as cache:
    for texts, array, kind in ((query_texts, queries, "query"), (corpus_texts, corpus, "corpus")):
      digest = hashlib.sha256(repr((model_name, None, None, texts)).encode()).hexdigest()
      np.save(os.path.join(cache, f"{kind}_embeddings_{digest}.npy"), array)
    dataset = datasets.Dataset.from_dict(
        {"query": query_texts, "positive": corpus_texts[:len(queries)]})
    start = time.perf_counter()
    mined = mine_hard_negatives(dataset, model, corpus=corpus_texts, range_max=RANGE_MAX,
                                num_negatives=NUM_NEGATIVES, sampling_strategy="top",
                                output_format="n-tuple", faiss_batch_size=1024,
                                use_faiss=use_faiss, verbose=False, cache_folder=cache)
    seconds = time.perf_counter() - start
    assert len(os.listdir(cache)) == 2, "sentence-transformers did not use the cached embeddings"
  negatives = [[int(mined[i][f"negative_{j}"].split()[1]) for j in range(1, NUM_NEGATIVES + 1)]
               for i in range(len(mined))]
  return seconds, negatives


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_docs", type=int, default=100_000)
  parser.add_argument("--num_queries", type=int, default=10_000)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--encode_docs", type=int, default=4096)
  parser.add_argument("--encode_queries", type=int, default=4096)
  parser.add_argument("--skip_faiss", action="store_true")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")

  docs_per_s, queries_per_s = measure_encode(args.encode_docs, args.encode_queries)
  encode_s = args.num_docs / docs_per_s + args.num_queries / queries_per_s

  rng = np.random.default_rng(0)
  queries = unit_gaussian(rng, args.num_queries, args.dim)
  corpus = unit_gaussian(rng, args.num_docs, args.dim)
  positives = [np.array([i]) for i in range(args.num_queries)]
  config = mining.MiningConfig(num_negatives=NUM_NEGATIVES, range_max=RANGE_MAX)
  from samtone_jax.evaluation import search  # pylint: disable=g-import-not-at-top
  search.exact_search(queries, corpus[:1000], RANGE_MAX + 1)  # compiles the same shapes
  start = time.perf_counter()
  scores, rows = search.exact_search(queries, corpus, RANGE_MAX + 1)
  search_s = time.perf_counter() - start
  positive_scores = [corpus[p] @ queries[q] for q, p in enumerate(positives)]
  start = time.perf_counter()
  ours = mining.select_negatives(scores, rows, positives, positive_scores, None, config)
  filter_s = time.perf_counter() - start
  ours_rows = [r.tolist() for r in ours.negative_rows]

  q = args.num_queries
  print(f"\n{args.num_docs:,} documents x {q:,} queries, D={args.dim}, k={RANGE_MAX + 1}, "
        f"{NUM_NEGATIVES} negatives per query\n")
  print("| stage | seconds | queries/s | note |")
  print("| --- | ---: | ---: | --- |")
  print(f"| encode (tiny demo model, projected) | {encode_s:.1f} | {q / encode_s:.0f} | "
        f"{docs_per_s:.0f} docs/s (L=64), {queries_per_s:.0f} queries/s (L=16) |")
  print(f"| search (exact_search) | {search_s:.1f} | {q / search_s:.0f} | |")
  print(f"| filter (select_negatives) | {filter_s:.2f} | {q / filter_s:.0f} | |")
  print(f"| ours: search + filter | {search_s + filter_s:.1f} | {q / (search_s + filter_s):.0f} "
        "| |")
  for use_faiss in (False,) if args.skip_faiss else (False, True):
    seconds, theirs = sentence_transformers_mine(queries, corpus, use_faiss)
    same = np.mean([a == b for a, b in zip(ours_rows, theirs)])
    name = "faiss IndexFlatIP" if use_faiss else "torch matmul + topk"
    print(f"| sentence-transformers ({name}) | {seconds:.1f} | {q / seconds:.0f} | "
          f"ours/theirs queries/s {seconds / (search_s + filter_s):.2f}; identical negative "
          f"lists {same:.4f} |")


if __name__ == "__main__":
  main()
