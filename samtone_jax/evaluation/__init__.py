"""Retrieval evaluation: trec_eval-equal metrics, exact top-k search, corpus encoding, protocols.

Modules (imported individually, so that metrics and search do not pull in TensorFlow/seqio):
  metrics    evaluate_run, evaluate_run_per_query, paired_t_test, paired_bootstrap_test,
             compare_runs: MRR@k, nDCG@k, Recall@k, P@k, MAP with trec_eval's semantics.
  search     exact_search: chunked, sharded inner-product top-k (on one CPU device the top-k runs
             in numpy beside the XLA product); merge_top_k of several parts.
  encoding   tokenize, encode_texts, encode_to_shards, load_embedding_shards,
             iter_embedding_shards, process_rows, embedding_dtype, dual_encoder_encode_fns.
  retrieval  evaluate_eval_set, evaluate_eval_sets: the MS MARCO, MultiReQA and BEIR protocols,
             results JSON and TREC run files.
  mining     MiningConfig, mine, mine_embeddings, select_negatives, write_hard_negatives,
             mine_to_directory: hard negatives for a training set (samtone-mine).
  runner     load_model, get_eval_set, evaluate_params: the one checkpoint loader.
"""
