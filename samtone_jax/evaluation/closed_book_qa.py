"""Closed-book QA evaluation of an encoder-decoder: decode each question, exact match.

Used by the trainer's eval hook (when the model is an `EncoderDecoderModel`) and by the `predict`
command. An eval set is spelled "TASK" or "TASK:SPLIT" (e.g. "demo_wordnet_qa:dev"; default split
"test"): a registered seqio QA task (`tasks/closed_book_qa.py`) whose examples carry the text
feature "answers". Every example of the split is decoded (batches padded to a fixed size, so the
decode compiles once); the score is `qa_metrics.exact_match` against all gold answers.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import functools
import json
import os
from typing import Any

import jax
import numpy as np
import seqio

from samtone_jax import errors
from samtone_jax import io_utils
from samtone_jax import partitioning
from samtone_jax.evaluation import qa_metrics
from samtone_jax.models import encoder_decoder as ed
from samtone_jax.models import seq2seq_model
from samtone_jax.tasks import closed_book_qa as qa_tasks
from samtone_jax.tasks import features

DEFAULT_SPLIT = "test"
METRIC = "exact_match"


def parse_eval_set(name: str) -> tuple[str, str]:
  """"TASK[:SPLIT]" -> (task, split)."""
  task, _, split = name.partition(":")
  return task, split or DEFAULT_SPLIT


def check_eval_sets(names: Sequence[str]) -> None:
  """Raises errors.ConfigError unless each name is a registered closed-book QA task (one whose
  examples carry "answers": registered by `tasks.closed_book_qa.register_qa_task`)."""
  for name in names:
    task_name, _ = parse_eval_set(name)
    try:
      task = seqio.get_mixture_or_task(task_name)
    except ValueError:
      raise errors.ConfigError(
          f"EVAL_TASKS entry {name!r}: {task_name!r} is not a registered seqio task; an "
          "encoder-decoder evaluates closed-book QA tasks spelled 'TASK' or 'TASK:SPLIT', e.g. "
          "'demo_wordnet_qa:dev'.") from None
    if not isinstance(task, seqio.Task) or (
        task.postprocessor is not qa_tasks.answers_postprocessor):
      raise errors.ConfigError(
          f"EVAL_TASKS entry {name!r}: task {task_name!r} has no {features.ANSWERS!r} feature; "
          "an encoder-decoder is evaluated by exact match on a closed-book QA task.")


def qa_examples(task_name: str, split: str, input_length: int) -> Iterator[dict[str, Any]]:
  """The split's examples in file order: {"question": str, "answers": list[str], "inputs": int32
  [input_length] token ids (EOS-terminated, truncated, 0-padded)}."""
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset({features.INPUTS: input_length, features.TARGETS: input_length},
                        split=split, shuffle=False, use_cached=False, num_epochs=1)
  vocabulary = task.output_features[features.INPUTS].vocabulary
  for example in ds.as_numpy_iterator():
    tokens = np.zeros([input_length], np.int32)
    ids = example[features.INPUTS][:input_length]
    tokens[:len(ids)] = ids
    answers = [a.decode("utf-8") for a in example[features.ANSWERS]]
    yield {"question": vocabulary.decode(ids.tolist()), "answers": answers, "inputs": tokens}


def decoded_text(tokens: np.ndarray, vocabulary: seqio.Vocabulary) -> str:
  """int [L] decoder output (0 after EOS) -> text: ids up to the first EOS, pads dropped."""
  ids = [int(t) for t in tokens]
  if ed.EOS_ID in ids:
    ids = ids[:ids.index(ed.EOS_ID)]
  return vocabulary.decode([i for i in ids if i != 0])


def predict(model: seq2seq_model.EncoderDecoderModel, params: Any, mesh: jax.sharding.Mesh,
            eval_set: str, *, input_length: int, max_decode_length: int, batch_size: int = 64,
            beam_size: int = 1) -> list[dict[str, Any]]:
  """Decodes every question of `eval_set`.

  Args:
    model: the encoder-decoder.
    params: its params (the EncoderDecoder tree), sharded or not.
    mesh: the mesh the params live on (the decode runs with its logical axis rules).
    eval_set: "TASK[:SPLIT]".
    input_length: questions are truncated/padded to this many tokens.
    max_decode_length: decoded tokens per answer (EOS included).
    batch_size: questions per decode call (the last batch is padded with empty rows).
    beam_size: 1 greedy, otherwise beam search.

  Returns:
    one {"question", "prediction", "answers", "correct"} per example, in file order.
  """
  task_name, split = parse_eval_set(eval_set)
  vocabulary = seqio.get_mixture_or_task(task_name).output_features[features.TARGETS].vocabulary
  decode = jax.jit(functools.partial(model.predict_batch, max_length=max_decode_length,
                                     beam_size=beam_size))

  def decode_batch(inputs: np.ndarray) -> np.ndarray:
    with partitioning.mesh_context(mesh):
      tokens, _ = decode(params, {seq2seq_model.ENCODER_INPUT_TOKENS: inputs})
    return np.asarray(jax.device_get(tokens))

  return predict_rows(qa_examples(task_name, split, input_length), decode_batch, vocabulary,
                      batch_size)


def predict_rows(examples: Iterable[dict[str, Any]],
                 decode_batch: Callable[[np.ndarray], np.ndarray],
                 vocabulary: seqio.Vocabulary, batch_size: int) -> list[dict[str, Any]]:
  """`predict`'s loop: batches `qa_examples`' rows (the last one padded with empty rows, so
  `decode_batch` always sees int32 [batch_size, Li]), decodes them with `decode_batch` (-> int
  [batch_size, L] tokens, 0 after EOS) and scores each prediction against its gold answers."""
  examples = list(examples)
  rows = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    inputs = np.zeros([batch_size, len(chunk[0]["inputs"])], np.int32)
    inputs[:len(chunk)] = np.stack([e["inputs"] for e in chunk])
    tokens = decode_batch(inputs)
    for example, row in zip(chunk, tokens):
      prediction = decoded_text(row, vocabulary)
      rows.append({"question": example["question"], "prediction": prediction,
                   "answers": example["answers"],
                   "correct": qa_metrics.exact_match_one(prediction, example["answers"])})
  return rows


def exact_match_of(rows: Sequence[dict[str, Any]]) -> float:
  """Exact match in [0, 1] of `predict`'s rows (qa_metrics.exact_match)."""
  return qa_metrics.exact_match([r["prediction"] for r in rows], [r["answers"] for r in rows])


def evaluate_params(model: seq2seq_model.EncoderDecoderModel, params: Any,
                    mesh: jax.sharding.Mesh, eval_sets: Sequence[str], *, input_length: int,
                    max_decode_length: int, output_dir: str | None = None,
                    batch_size: int = 64, beam_size: int = 1) -> dict[str, float]:
  """{"<eval_set>/exact_match": fraction} for each eval set; with `output_dir`, also writes
  <output_dir>/<eval_set>.predictions.jsonl (one row of `predict` per line) and metrics.json.

  Args:
    params: the EncoderDecoder params (`state.params["model"]` in the trainer).
    the rest: as for `predict`.
  """
  results = {}
  for eval_set in eval_sets:
    rows = predict(model, params, mesh, eval_set, input_length=input_length,
                   max_decode_length=max_decode_length, batch_size=batch_size,
                   beam_size=beam_size)
    results[f"{eval_set}/{METRIC}"] = exact_match_of(rows)
    if output_dir and jax.process_index() == 0:
      io_utils.makedirs(output_dir)
      path = os.path.join(output_dir, f"{eval_set.replace(':', '_')}.predictions.jsonl")
      with io_utils.open_file(path, "w") as f:
        for row in rows:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
  if output_dir and jax.process_index() == 0:
    with io_utils.open_file(os.path.join(output_dir, "metrics.json"), "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
  return results
