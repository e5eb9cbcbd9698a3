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
"""

QUERIES = "queries"
PASSAGES = "passages"
NEGATIVES = "negatives"
QUERY_IDS = "query_ids"
PASSAGE_IDS = "passage_ids"

PAD_ID = 0
EOS_ID = 1
