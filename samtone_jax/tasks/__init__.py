"""seqio tasks, mixtures, evaluation sets and the dual-encoder feature converter (data only).

  all.py               import it to register every task, mixture and eval set
  pipeline.py          get_train_iterator: per-host, deterministic, resumable numpy batches
  cache.py             cached tasks (seqio layout, TFRecord shards): cache_task, check_cache
  feature_converter.py DualEncoderFeatureConverter (task features -> model features)
  preprocessors.py     output features, tokenise + T5 EOS convention
  vocab.py             SentencePiece vocabularies (T5's public one, the demo's own)
  paths.py             where the data lives (env vars, configure_data_dirs)
  readers.py           line-numbered TSV/JSONL readers, DataFormatError, MissingDataError
  sources.py           seqio sources over Python readers
  demo.py, msmarco.py, multireqa.py, beir.py   the datasets
  knowledge_graph.py   KG triple readers, the SKILL masking preprocessors (seq2seq)
  closed_book_qa.py    MetaQA / FreebaseQA / TFDS QA readers, exact-match metric hook
  skill.py             the SKILL and closed-book QA task names, the WordNet demo tasks
  hard_negatives.py    training tasks from mined hard negatives (hard_negatives.jsonl)
  eval_sets.py         the EvalSet registry read by samtone_jax.evaluation
"""
