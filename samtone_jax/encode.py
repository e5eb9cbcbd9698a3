r"""Entry point writing embeddings of an evaluation set's corpus or queries for numpy / faiss.

  python -m samtone_jax.encode --gin_file=gin/experiments/demo_samtone.gin \
    --gin.CHECKPOINT_PATH=\"/tmp/run\" --gin.ENCODE_SET=\"demo_manpages_test\" \
    --gin.ENCODE_SIDE=\"corpus\" --gin.ENCODE_OUTPUT_DIR=\"/tmp/run/corpus_embeddings\"

Writes ENCODE_OUTPUT_DIR/embeddings-XXXXX.npy ([n_i, P], float32, or bfloat16 with
EVAL_EMBEDDING_DTYPE="bfloat16"), ids-XXXXX.json (the ids of those rows, in order) and
manifest.json (see `evaluation.encoding.encode_to_shards`; read them back with
`encoding.load_embedding_shards`). On several hosts each host encodes and writes only its slice
of the corpus (ENCODE_OUTPUT_DIR must then be a directory every host sees, e.g. gs://).
`gin/runs/encode.gin` binds `encode()`.
"""

from collections.abc import Sequence
import importlib

from absl import app

from samtone_jax import errors
from samtone_jax import cli
from samtone_jax.models import config as model_config_lib
from samtone_jax.tasks import eval_sets as eval_sets_lib

ENCODE_RUN_GIN = "runs/encode.gin"
SIDES = ("corpus", "queries")


def encode(*, checkpoint_path: str, model: model_config_lib.DualEncoderConfig, eval_set: str,
           side: str, output_dir: str, feature_lengths: dict[str, int] | None = None,
           batch_size: int = 256, shard_size: int = 1_000_000,
           mesh_shape: tuple[int, int] = (-1, 1), embedding_dtype: str = "float32",
           tasks_module: str = "samtone_jax.tasks.all") -> list[str]:
  """Embeds the corpus (document tower) or the queries (query tower) of `eval_set`.

  Args:
    checkpoint_path: a run directory, its checkpoints/ or one checkpoints/<step> directory.
    model: the architecture the checkpoint was trained with.
    eval_set: a registered evaluation set name.
    side: "corpus" or "queries".
    output_dir: where the .npy / ids shards go.
    feature_lengths: {"queries": Lq, "passages": Lp} to tokenise to instead of the set's own
      lengths (EVAL_FEATURE_LENGTHS); None: the set's lengths.
    batch_size: texts per encoder call.
    shard_size: rows per .npy shard.
    mesh_shape: (data, model) mesh sizes.
    embedding_dtype: "float32" or "bfloat16", the stored dtype (EVAL_EMBEDDING_DTYPE).
    tasks_module: imported to register the evaluation sets.

  Returns:
    The paths of the embedding shards.
  """
  if side not in SIDES:
    raise errors.ConfigError(f"ENCODE_SIDE={side!r}; expected one of {SIDES}")
  importlib.import_module(tasks_module)
  eval_sets_lib.check_registered([eval_set], "ENCODE_SET")  # before the model is loaded
  from samtone_jax.evaluation import encoding  # pylint: disable=g-import-not-at-top
  from samtone_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  dtype = encoding.embedding_dtype(embedding_dtype)  # before the model is loaded
  loaded = runner.load_model(checkpoint_path, model, mesh_shape)
  data = runner.get_eval_set(eval_set, feature_lengths, model.encoder.vocab_size)
  encode_queries, encode_documents = loaded.encode_fns()
  if side == "corpus":
    texts, encode_fn, length = data.corpus, encode_documents, data.document_length
  else:
    texts, encode_fn, length = data.queries, encode_queries, data.query_length
  ids = eval_sets_lib.document_ids(texts)
  paths = encoding.encode_to_shards(ids, eval_sets_lib.document_texts(texts, ids), encode_fn,
                                    data.vocabulary, length, output_dir, shard_size=shard_size,
                                    batch_size=batch_size, mesh=loaded.mesh,
                                    description=f"encoding {eval_set} {side}", dtype=dtype,
                                    per_process=True)
  print(f"Wrote {len(ids)} {side} embeddings of {eval_set} to {output_dir}", flush=True)
  return paths


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_configured_entry_point(ENCODE_RUN_GIN, "samtone_jax.encode", "encode")


def console_main() -> None:
  """The `samtone-encode` console script."""
  cli.run(main)


if __name__ == "__main__":
  console_main()
