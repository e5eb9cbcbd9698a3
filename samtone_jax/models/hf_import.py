"""Import of public T5, T5 1.1 and GTR weights (Hugging Face, sentence-transformers layouts).

Three entry points, all returning host (numpy float32) parameter trees that the caller places on
devices with the shardings of `partitioning.sharded_init`, e.g. `jax.device_put(params, shardings)`:

  import_t5_encoder(directory)      a Hugging Face T5 directory (config.json + model.safetensors,
                                    a sharded model.safetensors.index.json, or pytorch_model.bin)
                                    -> (T5Config, params of a standalone `T5Encoder`).
  import_sentence_transformers(directory[, tower_sharing])
                                    a sentence-transformers GTR directory (modules.json, the T5
                                    encoder at the Transformer module's path, 1_Pooling, 2_Dense,
                                    3_Normalize) -> (DualEncoderConfig, `DualEncoder` params).
                                    ADE modes get the same weights in both towers, except from
                                    a query/document `Router` (our ADE exports): one route each.
  import_t5_encoder_decoder(directory)
                                    a Hugging Face T5ForConditionalGeneration directory
                                    -> (EncoderDecoderConfig, `EncoderDecoder` params).

`dual_encoder_params` lays an encoder (and projection) into the dual-encoder tree of any
tower-sharing mode, e.g. to start a dual encoder from a T5 1.1 checkpoint (projection from init).

Torch Linear weights are [out, in]; our kernels are [in, out], so they are transposed.
The files are read by `samtone_jax.weight_files` (safetensors, bfloat16 included, or torch .bin),
only the tensors needed (a full encoder-decoder checkpoint is fine).
"""

import os
import pathlib
from typing import Any

import jax
import numpy as np

from samtone_jax import weight_files
from samtone_jax.models import dual_encoder
from samtone_jax.models import t5
from samtone_jax.models.config import DualEncoderConfig, EncoderDecoderConfig, T5Config

PathLike = str | os.PathLike

# config.json fields of HF's T5Config that define the architecture, with HF's defaults.
_HF_ARCHITECTURE_FIELDS = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6,
    "num_heads": 8, "feed_forward_proj": "relu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
}
def t5_config_from_hf(path: PathLike, **overrides: Any) -> T5Config:
  """Reads a Hugging Face T5 `config.json` (or the directory holding it) into a T5Config.

  Args:
    path: the config.json file or its directory.
    **overrides: T5Config fields that are not in the file or that you set yourself (dtype,
      dropout_rate, remat).

  Raises:
    FileNotFoundError, ValueError: naming the file and field.
  """
  path = weight_files.local_path(path)
  if path.is_dir():
    path = path / "config.json"
  raw = weight_files.read_json(path)
  fields = {name: raw.get(name, default) for name, default in _HF_ARCHITECTURE_FIELDS.items()}
  fields["dropout_rate"] = raw.get("dropout_rate", 0.1)
  if fields["feed_forward_proj"] not in ("relu", "gated-gelu"):
    raise ValueError(f"{path}: feed_forward_proj={fields['feed_forward_proj']!r} is not "
                     "supported; expected 'relu' (T5) or 'gated-gelu' (T5 1.1).")
  if raw.get("model_type", "t5") not in ("t5", "mt5"):
    raise ValueError(f"{path}: model_type={raw['model_type']!r}; expected 't5' or 'mt5'.")
  fields.update(overrides)
  return T5Config(**fields)


def _describe(config: T5Config) -> str:
  return (f"T5Config(vocab_size={config.vocab_size}, d_model={config.d_model}, "
          f"d_kv={config.d_kv}, d_ff={config.d_ff}, num_layers={config.num_layers}, "
          f"num_heads={config.num_heads}, feed_forward_proj={config.feed_forward_proj!r}, "
          f"relative_attention_num_buckets={config.relative_attention_num_buckets})")


def _check_architecture(config: T5Config, from_file: T5Config, file: pathlib.Path) -> None:
  """The given config must describe the checkpoint's architecture (weights alone can't tell
  e.g. relative_attention_max_distance)."""
  for name in _HF_ARCHITECTURE_FIELDS:
    if getattr(config, name) != getattr(from_file, name):
      raise ValueError(f"{file}: {name}={getattr(from_file, name)!r} but the given T5Config "
                       f"has {name}={getattr(config, name)!r}.")


def import_t5_encoder(directory: PathLike,
                      config: T5Config | None = None) -> tuple[T5Config, dict[str, Any]]:
  """Loads the encoder of a Hugging Face T5 / T5 1.1 checkpoint (encoder-only or full).

  Args:
    directory: holds config.json and the weights (see module docstring).
    config: the T5Config to load into (e.g. with dtype="bfloat16"); its architecture fields must
      match config.json. Default: `t5_config_from_hf(directory)`.

  Returns:
    (config, params) with params the `T5Encoder` tree (token_embedder included), numpy float32.

  Raises:
    KeyError / ValueError naming the file and tensor for missing or mis-shaped tensors.
  """
  directory = weight_files.local_path(directory)
  from_file = t5_config_from_hf(directory)
  if config is None:
    config = from_file
  else:
    _check_architecture(config, from_file, directory / "config.json")
  store = weight_files.TensorStore(directory)
  expects = _describe(config)
  c = config
  inner = c.num_heads * c.d_kv

  def linear(name, out_features, in_features):  # torch [out, in] -> kernel [in, out].
    return {"kernel": store.get(name, (out_features, in_features), expects).T}

  names = store.names()
  embedding_name = "shared.weight" if "shared.weight" in names else "encoder.embed_tokens.weight"
  params: dict[str, Any] = {
      "token_embedder": {
          "embedding": store.get(embedding_name, (c.vocab_size, c.d_model), expects)},
      "relpos_bias": {"rel_embedding": store.get(
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
          (c.relative_attention_num_buckets, c.num_heads), expects).T},
  }
  for i in range(c.num_layers):
    block = f"encoder.block.{i}.layer"
    attention = f"{block}.0.SelfAttention"
    ff = f"{block}.1.DenseReluDense"
    if c.feed_forward_proj == "relu":
      mlp = {"wi": linear(f"{ff}.wi.weight", c.d_ff, c.d_model)}
    else:
      mlp = {"wi_0": linear(f"{ff}.wi_0.weight", c.d_ff, c.d_model),
             "wi_1": linear(f"{ff}.wi_1.weight", c.d_ff, c.d_model)}
    mlp["wo"] = linear(f"{ff}.wo.weight", c.d_model, c.d_ff)
    params[f"layers_{i}"] = {
        "pre_attention_layer_norm": {
            "scale": store.get(f"{block}.0.layer_norm.weight", (c.d_model,), expects)},
        "attention": {
            "query": linear(f"{attention}.q.weight", inner, c.d_model),
            "key": linear(f"{attention}.k.weight", inner, c.d_model),
            "value": linear(f"{attention}.v.weight", inner, c.d_model),
            "out": linear(f"{attention}.o.weight", c.d_model, inner),
        },
        "pre_mlp_layer_norm": {
            "scale": store.get(f"{block}.1.layer_norm.weight", (c.d_model,), expects)},
        "mlp": mlp,
    }
  extra = f"encoder.block.{c.num_layers}.layer.0.layer_norm.weight"
  if extra in names:
    raise ValueError(f"{store.where(extra)}: holds more than {c.num_layers} encoder blocks "
                     f"(found {extra}) but {expects} has num_layers={c.num_layers}.")
  params["encoder_norm"] = {
      "scale": store.get("encoder.final_layer_norm.weight", (c.d_model,), expects)}
  if c.scan_layers:
    params = t5.stack_layers(params)
  return config, params


def encoder_decoder_config_from_hf(path: PathLike, **overrides: Any) -> EncoderDecoderConfig:
  """Reads a Hugging Face `T5ForConditionalGeneration` config.json (or its directory).

  The head is tied and rescaled (original T5) unless the file says `scale_decoder_outputs: false`
  (transformers 5) or `tie_word_embeddings: false` (transformers 4, T5 1.1 checkpoints).

  Args:
    path: the config.json file or its directory.
    **overrides: T5Config fields, as for `t5_config_from_hf`.
  """
  file = weight_files.local_path(path)
  if file.is_dir():
    file = file / "config.json"
  t5_config = t5_config_from_hf(file, **overrides)
  raw = weight_files.read_json(file)
  num_decoder_layers = raw.get("num_decoder_layers")
  if num_decoder_layers == t5_config.num_layers:
    num_decoder_layers = None
  if "scale_decoder_outputs" in raw:
    tied = bool(raw["scale_decoder_outputs"])
  else:
    tied = bool(raw.get("tie_word_embeddings", True))
  return EncoderDecoderConfig(t5=t5_config, num_decoder_layers=num_decoder_layers,
                              tie_word_embeddings=tied)


def import_t5_encoder_decoder(
    directory: PathLike,
    config: EncoderDecoderConfig | None = None) -> tuple[EncoderDecoderConfig, dict[str, Any]]:
  """Loads a Hugging Face `T5ForConditionalGeneration` checkpoint (T5 or T5 1.1).

  The encoder half is `import_t5_encoder`'s. The untied head is `lm_head.weight`, or
  `shared.weight` where transformers 5 saved the two as one tensor.

  Args:
    directory: holds config.json and the weights (see module docstring).
    config: the EncoderDecoderConfig to load into (e.g. with t5.dtype="bfloat16"); its
      architecture must match config.json. Default: `encoder_decoder_config_from_hf(directory)`.

  Returns:
    (config, params) with params the `EncoderDecoder` tree, numpy float32.

  Raises:
    KeyError / ValueError naming the file and tensor for missing or mis-shaped tensors, or a
    config that differs from config.json.
  """
  directory = weight_files.local_path(directory)
  from_file = encoder_decoder_config_from_hf(directory)
  if config is None:
    config = from_file
  else:
    _check_architecture(config.t5, from_file.t5, directory / "config.json")
    for name in ("decoder_layers", "tie_word_embeddings"):
      if getattr(config, name) != getattr(from_file, name):
        raise ValueError(f"{directory / 'config.json'}: {name}={getattr(from_file, name)!r} but "
                         f"the given EncoderDecoderConfig has {name}={getattr(config, name)!r}.")
  _, encoder = import_t5_encoder(directory, config.t5)
  store = weight_files.TensorStore(directory)
  c = config.t5
  expects = f"{_describe(c)} with {config.decoder_layers} decoder layers"
  inner = c.num_heads * c.d_kv

  def linear(name, out_features, in_features):  # torch [out, in] -> kernel [in, out].
    return {"kernel": store.get(name, (out_features, in_features), expects).T}

  def attention(prefix):
    return {"query": linear(f"{prefix}.q.weight", inner, c.d_model),
            "key": linear(f"{prefix}.k.weight", inner, c.d_model),
            "value": linear(f"{prefix}.v.weight", inner, c.d_model),
            "out": linear(f"{prefix}.o.weight", c.d_model, inner)}

  def norm(name):
    return {"scale": store.get(name, (c.d_model,), expects)}

  decoder: dict[str, Any] = {"relpos_bias": {"rel_embedding": store.get(
      "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
      (c.relative_attention_num_buckets, c.num_heads), expects).T}}
  for i in range(config.decoder_layers):
    block = f"decoder.block.{i}.layer"
    ff = f"{block}.2.DenseReluDense"
    if c.feed_forward_proj == "relu":
      mlp = {"wi": linear(f"{ff}.wi.weight", c.d_ff, c.d_model)}
    else:
      mlp = {"wi_0": linear(f"{ff}.wi_0.weight", c.d_ff, c.d_model),
             "wi_1": linear(f"{ff}.wi_1.weight", c.d_ff, c.d_model)}
    mlp["wo"] = linear(f"{ff}.wo.weight", c.d_model, c.d_ff)
    decoder[f"layers_{i}"] = {
        "pre_self_attention_layer_norm": norm(f"{block}.0.layer_norm.weight"),
        "self_attention": attention(f"{block}.0.SelfAttention"),
        "pre_cross_attention_layer_norm": norm(f"{block}.1.layer_norm.weight"),
        "encoder_decoder_attention": attention(f"{block}.1.EncDecAttention"),
        "pre_mlp_layer_norm": norm(f"{block}.2.layer_norm.weight"),
        "mlp": mlp,
    }
  names = store.names()
  extra = f"decoder.block.{config.decoder_layers}.layer.0.layer_norm.weight"
  if extra in names:
    raise ValueError(f"{store.where(extra)}: holds more than {config.decoder_layers} decoder "
                     f"blocks (found {extra}) but {expects}.")
  decoder["decoder_norm"] = norm("decoder.final_layer_norm.weight")
  embedding = encoder["token_embedder"]["embedding"]
  has_head = "lm_head.weight" in names
  head = store.get("lm_head.weight", (c.vocab_size, c.d_model), expects) if has_head else None
  if not config.tie_word_embeddings:
    decoder["logits_dense"] = {"kernel": (embedding if head is None else head).T.copy()}
  elif head is not None and not np.array_equal(head, embedding):
    raise ValueError(f"{store.where('lm_head.weight')}: lm_head.weight differs from the shared "
                     "embedding, but config.json ties them (original T5 rescaled head); set "
                     "tie_word_embeddings=false in config.json if the head is separate (T5 1.1).")
  if c.scan_layers:
    decoder = t5.stack_layers(decoder)
  params = {"token_embedder": encoder["token_embedder"],
            "encoder": {k: v for k, v in encoder.items() if k != "token_embedder"},
            "decoder": decoder}
  return config, params


def dual_encoder_params(config: DualEncoderConfig, encoder_params: dict[str, Any],
                        projection_kernel: np.ndarray | None = None) -> dict[str, Any]:
  """Lays one encoder (and projection) into the `DualEncoder` tree of `config.tower_sharing`.

  Both towers get the same values in ADE modes (they then train apart).

  Args:
    config: the dual encoder config.
    encoder_params: a standalone `T5Encoder` tree, `token_embedder` included.
    projection_kernel: [d_model, projection_dim], or None to leave the projection(s) out, e.g.
      to take them from a fresh init: `{**init_params, **dual_encoder_params(config, enc)}`.

  Returns:
    The `params` collection of `DualEncoder(config)` (see dual_encoder.py for the layout).
  """
  if projection_kernel is not None:
    expected = (config.encoder.d_model, config.projection_dim)
    if tuple(projection_kernel.shape) != expected:
      raise ValueError(f"projection kernel has shape {tuple(projection_kernel.shape)} but "
                       f"DualEncoderConfig expects {expected} (d_model, projection_dim).")
  return dual_encoder_params_per_tower(config, {side: (encoder_params, projection_kernel)
                                                for side in dual_encoder.SIDES})


def dual_encoder_params_per_tower(
    config: DualEncoderConfig,
    towers: dict[str, tuple[dict[str, Any], np.ndarray | None]]) -> dict[str, Any]:
  """Lays each tower's encoder (and projection) into the `DualEncoder` tree (the inverse of
  `hf_export.tower_params`).

  Args:
    config: the dual encoder config.
    towers: {"query": (encoder_params, projection_kernel), "document": (...)}; encoder_params a
      standalone `T5Encoder` tree with `token_embedder`; projection_kernel [d_model, P] or None
      (left out). A part that `config.tower_sharing` shares must be equal in both towers.

  Raises:
    ValueError: a shared part differs between the towers, naming the part.
  """
  params: dict[str, Any] = {}
  for side in dual_encoder.SIDES:
    encoder_params, projection_kernel = towers[side]
    parts = {"token_embedder": encoder_params["token_embedder"],
             "encoder": {k: v for k, v in encoder_params.items() if k != "token_embedder"}}
    if projection_kernel is not None:
      parts["projection"] = {"kernel": projection_kernel}
    for part, name in dual_encoder.tower_parameter_names(config.tower_sharing, side).items():
      if part not in parts:
        continue
      if name in params:  # Shared, already laid out by the other tower.
        equal = jax.tree.all(jax.tree.map(lambda a, b: a is b or np.array_equal(a, b),
                                          params[name], parts[part]))
        if not equal:
          raise ValueError(f"tower_sharing={config.tower_sharing!r} shares the {part} but the "
                           "query and document towers have different values for it.")
        continue
      params[name] = parts[part]
  return params


def import_sentence_transformers(
    directory: PathLike, tower_sharing: str | None = None,
    config: DualEncoderConfig | None = None) -> tuple[DualEncoderConfig, dict[str, Any]]:
  """Loads a GTR-style sentence-transformers model (T5 encoder, pooling, Dense, Normalize).

  Supported modules.json pipelines: Transformer (T5) -> Pooling (mean tokens or CLS/first token)
  -> [Dense without bias, identity activation] -> [Normalize]. Without a Dense module the
  projection is the identity (projection_dim = d_model). A `Router` with "query" and "document"
  routes of such pipelines (what `samtone_jax.export` writes for ADE models) loads each route into
  its tower. Both the pre-5 (`pooling_mode_mean_tokens`) and the current (`pooling_mode`) Pooling
  configs are read.

  Args:
    directory: the sentence-transformers directory (with modules.json).
    tower_sharing: the tower-sharing mode to lay the weights out for (ignored if `config`);
      default "sde" for one pipeline, "ade" for a Router. Parts the mode shares must be equal in
      both routes.
    config: the DualEncoderConfig to load into; its pooling, normalisation and projection_dim
      must match the files. Default: read from the files.

  Returns:
    (config, params) with params the `DualEncoder` `params` collection, numpy float32.
  """
  directory = weight_files.local_path(directory)
  modules_file = directory / "modules.json"
  modules = weight_files.read_json(modules_file)
  if not isinstance(modules, list):
    raise ValueError(f"{modules_file}: expected a JSON list of modules.")
  kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
  t5_config = config.encoder if config is not None else None
  if kinds == ["Router"]:
    router_dir = directory / modules[0].get("path", "")
    router_file = router_dir / "router_config.json"
    router = weight_files.read_json(router_file)
    structure, types = router.get("structure", {}), router.get("types", {})
    if sorted(structure) != ["document", "query"]:
      raise ValueError(f"{router_file}: routes {sorted(structure)}; expected 'query' and "
                       "'document'.")
    towers = {}
    for side in dual_encoder.SIDES:
      route = [{"type": types.get(module_id, ""), "path": module_id}
               for module_id in structure[side]]
      towers[side] = _read_pipeline(router_dir, route, f"{router_file} route {side!r}",
                                    t5_config)
    found = {side: towers[side][1:4] for side in towers}  # pooling, projection_dim, normalize
    if found["query"] != found["document"]:
      raise ValueError(f"{router_file}: the routes differ in pooling / projection size / "
                       f"normalisation ({found}); a dual encoder has one of each.")
    if towers["query"][0][0] != towers["document"][0][0]:
      raise ValueError(f"{router_file}: the routes' T5 encoders have different architectures.")
    default_sharing = "ade"
  else:
    towers = {"query": _read_pipeline(directory, modules, str(modules_file), t5_config)}
    towers["document"] = towers["query"]
    default_sharing = "sde"
  (t5_config, _), pooling, projection_dim, normalize = towers["query"][:4]
  if config is None:
    config = DualEncoderConfig(encoder=t5_config, tower_sharing=tower_sharing or default_sharing,
                               pooling=pooling, projection_dim=projection_dim,
                               normalize=normalize)
  else:
    found = {"pooling": pooling, "projection_dim": projection_dim, "normalize": normalize}
    for name, value in found.items():
      if getattr(config, name) != value:
        raise ValueError(f"{directory}: the checkpoint has {name}={value!r} but the given "
                         f"DualEncoderConfig has {name}={getattr(config, name)!r}.")
  expected = (config.encoder.d_model, config.projection_dim)
  for side, tower in towers.items():
    if tuple(tower[4].shape) != expected:
      raise ValueError(f"{directory}: the {side} projection has shape {tuple(tower[4].shape)} "
                       f"but DualEncoderConfig expects {expected} (d_model, projection_dim).")
  return config, dual_encoder_params_per_tower(
      config, {side: (tower[0][1], tower[4]) for side, tower in towers.items()})


def _read_pooling(pooling_file: pathlib.Path) -> str:
  """"mean" or "first" from a Pooling module's config.json (either sentence-transformers format)."""
  raw = weight_files.read_json(pooling_file)
  if "pooling_mode" in raw:  # sentence-transformers >= 5.x: "mean", "cls", ... or a list.
    mode = raw["pooling_mode"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    modes = ["pooling_mode_cls_token" if m == "cls" else f"pooling_mode_{m}_tokens"
             for m in modes]
  else:
    modes = [name for name in ("pooling_mode_mean_tokens", "pooling_mode_cls_token",
                               "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                               "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
             if raw.get(name)]
  pooling = {("pooling_mode_mean_tokens",): "mean", ("pooling_mode_cls_token",): "first"}.get(
      tuple(modes))
  if pooling is None:
    raise ValueError(f"{pooling_file}: pooling modes {modes} are not supported; expected exactly "
                     "one of pooling_mode_mean_tokens, pooling_mode_cls_token.")
  return pooling


def _read_pipeline(directory: pathlib.Path, modules: list[dict[str, Any]], source: str,
                   t5_config: T5Config | None):
  """One Transformer -> Pooling -> [Dense] -> [Normalize] pipeline.

  Args:
    directory: the directory the modules' paths are relative to.
    modules: [{"type": ..., "path": ...}] in order.
    source: the file that lists them, for errors.
    t5_config: the T5Config to load into, or None (from config.json).

  Returns:
    ((t5_config, encoder_params), pooling, projection_dim, normalize, projection_kernel).
  """
  by_kind: dict[str, dict[str, Any]] = {}
  for module in modules:
    kind = str(module.get("type", "")).rsplit(".", 1)[-1]
    if kind not in ("Transformer", "Pooling", "Dense", "Normalize"):
      raise ValueError(f"{source}: module {module.get('path')!r} of type "
                       f"{module.get('type')!r} is not supported (Transformer, Pooling, Dense, "
                       "Normalize).")
    if kind in by_kind:
      raise ValueError(f"{source}: more than one {kind} module.")
    by_kind[kind] = module
  for kind in ("Transformer", "Pooling"):
    if kind not in by_kind:
      raise ValueError(f"{source}: no {kind} module.")

  pooling = _read_pooling(directory / by_kind["Pooling"].get("path", "") / "config.json")
  transformer_dir = directory / by_kind["Transformer"].get("path", "")
  t5_config, encoder_params = import_t5_encoder(transformer_dir, t5_config)

  projection_dim = t5_config.d_model
  if "Dense" in by_kind:
    dense_dir = directory / by_kind["Dense"].get("path", "")
    dense_file = dense_dir / "config.json"
    dense_raw = weight_files.read_json(dense_file)
    if dense_raw.get("bias", True):
      raise ValueError(f"{dense_file}: bias=true is not supported (GTR's Dense has no bias).")
    activation = str(dense_raw.get("activation_function", ""))
    if not activation.endswith("Identity"):
      raise ValueError(f"{dense_file}: activation_function={activation!r}; only the identity "
                       "is supported.")
    if dense_raw.get("use_residual", False):
      raise ValueError(f"{dense_file}: use_residual=true is not supported.")
    if dense_raw.get("in_features") != t5_config.d_model:
      raise ValueError(f"{dense_file}: in_features={dense_raw.get('in_features')} but the "
                       f"encoder has d_model={t5_config.d_model}.")
    projection_dim = int(dense_raw["out_features"])
    weight = weight_files.TensorStore(dense_dir).get(
        "linear.weight", (projection_dim, t5_config.d_model),
        f"{dense_file.name} (in_features={t5_config.d_model}, out_features={projection_dim})")
    projection_kernel = weight.T
  else:
    # No Dense module: an identity projection keeps one model structure for every checkpoint.
    projection_kernel = np.eye(t5_config.d_model, dtype=np.float32)
  normalize = "Normalize" in by_kind
  return (t5_config, encoder_params), pooling, projection_dim, normalize, projection_kernel
