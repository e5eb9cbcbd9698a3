"""Names of the model features that the data pipeline produces and the model consumes.

Batches are dicts of numpy/jax arrays:
  queries:      int32 [B, Lq]     query token ids, 0 = padding, EOS-terminated (T5 convention).
  passages:     int32 [B, Lp]     positive passage token ids.
  negatives:    int32 [B, N, Lp]  hard-negative passage token ids (only when the task has them).
  query_ids:    int32 [B]         fingerprint of the query's padded token ids (equal texts give
                                  equal ids); equal ids are never each other's negative in the
                                  loss (repeated questions).
  passage_ids:  int32 [B]         fingerprint of the passage's token ids (shared answers).

`feature_converter.DualEncoderFeatureConverter` produces them; `pipeline.get_train_iterator` is
what a trainer calls.

Seq2seq tasks (SKILL knowledge infusion, closed-book QA; seqio's "inputs"/"targets" convention):
  inputs:       int32 [<=Li]      encoder token ids, EOS-terminated.
  targets:      int32 [<=Lt]      decoder target token ids, EOS-terminated.
  answers:      string [A]        every gold answer of a QA example (for exact match; not a model
                                  feature, so feature converters drop it).
"""

QUERIES = "queries"
PASSAGES = "passages"
NEGATIVES = "negatives"
QUERY_IDS = "query_ids"
PASSAGE_IDS = "passage_ids"
INPUTS = "inputs"
TARGETS = "targets"
ANSWERS = "answers"

PAD_ID = 0
EOS_ID = 1
