"""A trained dual encoder as a sentence-transformers directory (Hugging Face T5 inside).

  SDE:  Transformer (T5EncoderModel) -> Pooling -> Dense (no bias) -> [Normalize]
  ADE and variants: one `Router` whose "query" and "document" routes each run their own
        Transformer (a full T5EncoderModel per tower, so a shared token embedder is stored
        twice) -> Pooling -> Dense -> [Normalize]; a projection that the tower sharing shares
        (ADE-SPL) is one Dense module used by both routes. `encode_query` / `encode_document` pick
        the tower; plain `encode` uses the document tower.

The tokenizer is the training SentencePiece model converted to a `tokenizers` tokenizer that
appends EOS after truncation, so `SentenceTransformer(dir).encode(texts)` reproduces
`samtone_jax.evaluation.encoding.tokenize` (cut to L - 1 pieces, EOS) and our embeddings.
Known difference: HF tokenizers read the literal strings "<pad>", "</s>" and "<unk>" in a text as
those special tokens; SentencePiece reads them as characters.

Needs torch, transformers >= 5 and sentence-transformers >= 6 (`Router`, and the module paths
`sentence_transformers.base.modules` / `.sentence_transformer.modules` that 6.0 introduced; the
export's modules.json names those classes, so loading it needs sentence-transformers >= 6 too). They
are imported here only, so the rest of samtone_jax runs without them.
"""

import importlib
import json
import pathlib
import tempfile
from typing import Any

import numpy as np
import safetensors.numpy

from samtone_jax.exporting import staging
from samtone_jax.models import dual_encoder
from samtone_jax.models import hf_export
from samtone_jax.models.config import DualEncoderConfig, T5Config

_POOLING = {"mean": "mean", "first": "cls"}
# The oldest major versions whose module layout this writer uses (see the module docstring).
MIN_VERSIONS = {"sentence_transformers": 6, "transformers": 5}


def import_torch_stack():
  """(sentence_transformers, torch, transformers), or an ExportError saying what to install.

  `export` calls it before loading the checkpoint, so a missing or too old package fails fast.
  """
  install = "install them, e.g. pip install 'samtone_jax[export]'"
  try:
    import sentence_transformers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise staging.ExportError(
        "EXPORT_FORMAT='sentence_transformers' needs torch, transformers >= 5 and "
        f"sentence-transformers >= 6 ({e}); {install}.") from e
  for module in (sentence_transformers, transformers):
    version = getattr(module, "__version__", "0")
    if int(version.split(".")[0]) < MIN_VERSIONS[module.__name__]:
      raise staging.ExportError(
          f"EXPORT_FORMAT='sentence_transformers' needs {module.__name__.replace('_', '-')} >= "
          f"{MIN_VERSIONS[module.__name__]} (installed: {version}; the writer uses its module "
          f"layout); {install}.")
  return sentence_transformers, torch, transformers


def hf_tokenizer(sentencepiece_model: bytes) -> Any:
  """A `transformers` tokenizer that encodes like SentencePiece, then appends EOS (id 1).

  Args:
    sentencepiece_model: the serialized SentencePiece model the model was trained with (e.g.
      `seqio.SentencePieceVocabulary.sp_model`), T5's id convention (pad 0, eos 1, unk 2).
  """
  import_torch_stack()
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  from transformers.tokenization_utils_tokenizers import TokenizersBackend  # pylint: disable=g-import-not-at-top
  # `transformers.convert_slow_tokenizer` is shadowed by a function of that name.
  converters = importlib.import_module("transformers.convert_slow_tokenizer")
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(sentencepiece_model)
  ids = {"<pad>": 0, "</s>": 1, "<unk>": 2}
  for piece, expected in ids.items():
    if len(proto.pieces) <= expected or proto.pieces[expected].piece != piece:
      raise ValueError(f"the SentencePiece model does not follow T5's ids ({ids}); id "
                       f"{expected} is {proto.pieces[expected].piece!r}.")
  # BPE models are built from {piece: id} (merges from the scores), unigram from (piece, score);
  # legacy=True: SentencePiece's dummy-prefix and whitespace handling.
  bpe = proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
  vocab = ({p.piece: i for i, p in enumerate(proto.pieces)} if bpe
           else [(p.piece, p.score) for p in proto.pieces])
  backend = converters.SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
  if backend is None:
    raise ValueError(f"SentencePiece model type {proto.trainer_spec.model_type} is not supported.")
  backend.post_processor = processors.TemplateProcessing(
      single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
  return TokenizersBackend(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>")


def write_t5_encoder(directory: pathlib.Path, config: T5Config, encoder_params: dict[str, Any],
                     tokenizer: Any | None = None) -> None:
  """Writes a Hugging Face `T5EncoderModel` directory (config.json, model.safetensors, and the
  tokenizer's files when given)."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(
      json.dumps(hf_export.hf_t5_config(config), indent=2) + "\n")
  state = hf_export.t5_encoder_state_dict(config, encoder_params)
  safetensors.numpy.save_file(state, str(directory / "model.safetensors"),
                              metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(str(directory))


def write(directory: pathlib.Path, config: DualEncoderConfig, params: dict[str, Any],
          sentencepiece_model: bytes, max_seq_lengths: dict[str, int]) -> None:
  """Writes the sentence-transformers directory of a dual encoder into `directory`.

  Args:
    directory: an empty local directory.
    config: the dual encoder's architecture.
    params: its `params` collection (host or device arrays).
    sentencepiece_model: the serialized SentencePiece model it was trained with.
    max_seq_lengths: {"queries": Lq, "passages": Lp}; SDE (one Transformer module) uses
      max(Lq, Lp) for both.
  """
  sentence_transformers, torch, _ = import_torch_stack()
  modules = importlib.import_module("sentence_transformers.base.modules")
  pooling_lib = importlib.import_module("sentence_transformers.sentence_transformer.modules")
  tokenizer = hf_tokenizer(sentencepiece_model)
  enc = config.encoder
  pooling = pooling_lib.Pooling(enc.d_model, pooling_mode=_POOLING[config.pooling])
  normalize = [modules.Normalize()] if config.normalize else []
  lengths = {"query": max_seq_lengths["queries"], "document": max_seq_lengths["passages"]}
  if config.tower_sharing == "sde":
    lengths = dict.fromkeys(lengths, max(lengths.values()))
  sides = ("query",) if config.tower_sharing == "sde" else dual_encoder.SIDES
  dense_by_name: dict[str, Any] = {}
  routes = {}
  with tempfile.TemporaryDirectory() as scratch:
    for side in sides:
      encoder_params, kernel = hf_export.tower_params(config, params, side)
      hf_dir = pathlib.Path(scratch) / side
      write_t5_encoder(hf_dir, enc, encoder_params, tokenizer)
      transformer = modules.Transformer(str(hf_dir), max_seq_length=lengths[side])
      projection_name = dual_encoder.tower_parameter_names(config.tower_sharing, side)["projection"]
      if projection_name not in dense_by_name:  # A shared projection is one module.
        dense_by_name[projection_name] = modules.Dense(
            enc.d_model, config.projection_dim, bias=False,
            activation_function=torch.nn.Identity(),
            init_weight=torch.from_numpy(np.ascontiguousarray(kernel.T)))
      routes[side] = [transformer, pooling, dense_by_name[projection_name], *normalize]
    if config.tower_sharing == "sde":
      model = sentence_transformers.SentenceTransformer(modules=routes["query"], device="cpu")
    else:
      router = modules.Router.for_query_document(query_modules=routes["query"],
                                                 document_modules=routes["document"])
      model = sentence_transformers.SentenceTransformer(modules=[router], device="cpu")
    model.save(str(directory))


USAGE = """## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{path}")
query_embeddings = model.encode_query(["how do I list files"])
document_embeddings = model.encode_document(["ls lists directory contents"])
scores = model.similarity(query_embeddings, document_embeddings)
```

Loading needs sentence-transformers >= 6 and transformers >= 5 (the module and tokenizer classes
that modules.json and tokenizer_config.json name). ADE exports hold a `Router`: `encode_query` runs the query tower, `encode_document` (and plain
`encode`) the document tower. The tokenizer encodes like the training SentencePiece model, except
that the literal strings "<pad>", "</s>" and "<unk>" become those special tokens.
"""
