"""Import of public T5, T5 1.1 and GTR weights (Hugging Face, sentence-transformers layouts).

Two entry points, both returning host (numpy float32) parameter trees that the caller places on
devices with the shardings of `partitioning.sharded_init`, e.g. `jax.device_put(params, shardings)`:

  import_t5_encoder(directory)      a Hugging Face T5 directory (config.json + model.safetensors,
                                    a sharded model.safetensors.index.json, or pytorch_model.bin)
                                    -> (T5Config, params of a standalone `T5Encoder`).
  import_sentence_transformers(directory, tower_sharing)
                                    a sentence-transformers GTR directory (modules.json, the T5
                                    encoder at the Transformer module's path, 1_Pooling, 2_Dense,
                                    3_Normalize) -> (DualEncoderConfig, `DualEncoder` params).
                                    ADE modes get the same weights in both towers.

`dual_encoder_params` lays an encoder (and projection) into the dual-encoder tree of any
tower-sharing mode, e.g. to start a dual encoder from a T5 1.1 checkpoint (projection from init).

Torch Linear weights are [out, in]; our kernels are [in, out], so they are transposed.
Reading .bin files needs torch (imported only then); safetensors files are read directly,
bfloat16 included, only the tensors needed (a full encoder-decoder checkpoint is fine).
"""

import json
import os
import pathlib
import struct
from typing import Any

import ml_dtypes
import numpy as np

from samtone_jax.models import dual_encoder
from samtone_jax.models import t5
from samtone_jax.models.config import DualEncoderConfig, T5Config

PathLike = str | os.PathLike

# config.json fields of HF's T5Config that define the architecture, with HF's defaults.
_HF_ARCHITECTURE_FIELDS = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6,
    "num_heads": 8, "feed_forward_proj": "relu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}



def _local_path(path: PathLike) -> pathlib.Path:
  """The path as a local `pathlib.Path`; remote URLs are refused with what to do instead.

  Hugging Face / sentence-transformers checkpoints are read with seeks into safetensors files, which
  this module does on local files only (a `gs://` path given to pathlib would silently become a
  wrong local path).
  """
  text = os.fspath(path)
  if "://" in text and not text.startswith("file://"):
    raise ValueError(f"{text}: weight import reads local directories only; copy the checkpoint "
                     f"to local disk first (e.g. `gsutil -m cp -r {text} /tmp/`) and pass that path.")
  return pathlib.Path(text.removeprefix("file://"))


def t5_config_from_hf(path: PathLike, **overrides: Any) -> T5Config:
  """Reads a Hugging Face T5 `config.json` (or the directory holding it) into a T5Config.

  Args:
    path: the config.json file or its directory.
    **overrides: T5Config fields that are not in the file or that you set yourself (dtype,
      dropout_rate, remat).

  Raises:
    FileNotFoundError, ValueError: naming the file and field.
  """
  path = _local_path(path)
  if path.is_dir():
    path = path / "config.json"
  raw = _read_json(path)
  fields = {name: raw.get(name, default) for name, default in _HF_ARCHITECTURE_FIELDS.items()}
  fields["dropout_rate"] = raw.get("dropout_rate", 0.1)
  if fields["feed_forward_proj"] not in ("relu", "gated-gelu"):
    raise ValueError(f"{path}: feed_forward_proj={fields['feed_forward_proj']!r} is not "
                     "supported; expected 'relu' (T5) or 'gated-gelu' (T5 1.1).")
  if raw.get("model_type", "t5") not in ("t5", "mt5"):
    raise ValueError(f"{path}: model_type={raw['model_type']!r}; expected 't5' or 'mt5'.")
  fields.update(overrides)
  return T5Config(**fields)


class _TensorStore:
  """Lazy name -> numpy tensor lookup over one checkpoint directory, with precise errors."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    present = [name for name in _WEIGHT_FILES if (directory / name).is_file()]
    if not present:
      raise FileNotFoundError(
          f"{directory}: no weights; expected one of {', '.join(_WEIGHT_FILES)}.")
    self.source = directory / present[0]  # safetensors preferred (the order of _WEIGHT_FILES).
    if self.source.name.endswith(".index.json"):
      weight_map = _read_json(self.source).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{self.source}: no 'weight_map' object.")
      self._file_of = {name: directory / file for name, file in weight_map.items()}
    else:
      self._file_of = None
    self._cache: dict[pathlib.Path, dict[str, Any]] = {}

  def _index(self, file: pathlib.Path) -> dict[str, Any]:
    """name -> lazily readable tensor of one file."""
    if file not in self._cache:
      if not file.is_file():
        raise FileNotFoundError(f"{self.source}: refers to {file.name}, which does not exist.")
      if file.name.endswith(".safetensors"):
        self._cache[file] = _safetensors_index(file)
      else:
        self._cache[file] = _torch_load(file)
    return self._cache[file]

  def names(self) -> set[str]:
    if self._file_of is not None:
      return set(self._file_of)
    return set(self._index(self.source))

  def where(self, name: str) -> pathlib.Path:
    """The file that holds (or would hold) `name`."""
    if self._file_of is not None and name in self._file_of:
      return self._file_of[name]
    return self.source

  def get(self, name: str, expected_shape: tuple[int, ...], expects: str) -> np.ndarray:
    """The tensor `name` as float32 numpy, checked to have `expected_shape`.

    Args:
      name: the tensor's name in the checkpoint.
      expected_shape: its shape as stored (torch layout).
      expects: who expects it, for the error, e.g. "T5Config(d_model=512, ...)".
    """
    if name not in self.names():
      raise KeyError(f"{self.source}: tensor {name} is missing but {expects} needs it.")
    file = self.where(name)
    tensor = self._index(file)[name]
    shape = tuple(tensor.shape)
    if shape != tuple(expected_shape):
      raise ValueError(f"{file}: tensor {name} has shape {shape} but {expects} expects "
                       f"{tuple(expected_shape)}.")
    return _to_numpy_float32(tensor)


class _SafetensorsTensor:
  """One tensor of a safetensors file, read on demand (no torch, bfloat16 supported)."""

  def __init__(self, file: pathlib.Path, data_start: int, info: dict[str, Any]):
    self.file, self.data_start, self.info = file, data_start, info
    self.shape = tuple(info["shape"])

  def read(self) -> np.ndarray:
    dtype = _SAFETENSORS_DTYPES.get(self.info["dtype"])
    if dtype is None:
      raise ValueError(f"{self.file}: unsupported safetensors dtype {self.info['dtype']}.")
    begin, end = self.info["data_offsets"]
    with open(self.file, "rb") as f:
      f.seek(self.data_start + begin)
      data = f.read(end - begin)
    return np.frombuffer(data, dtype=dtype).reshape(self.shape)


def _safetensors_index(file: pathlib.Path) -> dict[str, _SafetensorsTensor]:
  # Format: u64 little-endian header size, JSON header {name: {dtype, shape, data_offsets}}, data.
  with open(file, "rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    try:
      header = json.loads(f.read(header_size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{file}: not a safetensors file ({e}).") from e
  header.pop("__metadata__", None)
  return {name: _SafetensorsTensor(file, 8 + header_size, info) for name, info in header.items()}


def _torch_load(file: pathlib.Path) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{file}: reading PyTorch .bin checkpoints needs torch "
                      "(pip install torch --index-url https://download.pytorch.org/whl/cpu), "
                      "or convert the checkpoint to model.safetensors.") from e
  state = torch.load(file, map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f"{file}: expected a state dict, got {type(state).__name__}.")
  return state


def _to_numpy_float32(tensor: Any) -> np.ndarray:
  if isinstance(tensor, _SafetensorsTensor):
    return np.asarray(tensor.read(), dtype=np.float32)
  return tensor.detach().float().numpy()  # A torch tensor from a .bin file.


def _read_json(path: pathlib.Path) -> Any:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file.")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}.") from e


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
  directory = _local_path(directory)
  from_file = t5_config_from_hf(directory)
  if config is None:
    config = from_file
  else:
    _check_architecture(config, from_file, directory / "config.json")
  store = _TensorStore(directory)
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
  parts = {dual_encoder.TOKEN_EMBEDDER: encoder_params[dual_encoder.TOKEN_EMBEDDER],
           "encoder": {k: v for k, v in encoder_params.items()
                       if k != dual_encoder.TOKEN_EMBEDDER}}
  if projection_kernel is not None:
    expected = (config.encoder.d_model, config.projection_dim)
    if tuple(projection_kernel.shape) != expected:
      raise ValueError(f"projection kernel has shape {tuple(projection_kernel.shape)} but "
                       f"DualEncoderConfig expects {expected} (d_model, projection_dim).")
    parts["projection"] = {"kernel": projection_kernel}
  # Each part under its name(s) in the tower-sharing table; both towers get the same values.
  return {dual_encoder.param_name(config.tower_sharing, part, side): value
          for part, value in parts.items() for side in dual_encoder.SIDES}


def import_sentence_transformers(
    directory: PathLike, tower_sharing: str = "sde",
    config: DualEncoderConfig | None = None) -> tuple[DualEncoderConfig, dict[str, Any]]:
  """Loads a GTR-style sentence-transformers model (T5 encoder, pooling, Dense, Normalize).

  Supported modules.json pipelines: Transformer (T5) -> Pooling (mean tokens or CLS/first token)
  -> [Dense without bias, identity activation] -> [Normalize]. Without a Dense module the
  projection is the identity (projection_dim = d_model).

  Args:
    directory: the sentence-transformers directory (with modules.json).
    tower_sharing: the tower-sharing mode to lay the weights out for (ignored if `config`).
    config: the DualEncoderConfig to load into; its pooling, normalisation and projection_dim
      must match the files. Default: read from the files.

  Returns:
    (config, params) with params the `DualEncoder` `params` collection, numpy float32.
  """
  directory = _local_path(directory)
  modules_file = directory / "modules.json"
  modules = _read_json(modules_file)
  by_kind: dict[str, dict[str, Any]] = {}
  for module in modules:
    kind = str(module.get("type", "")).rsplit(".", 1)[-1]
    if kind not in ("Transformer", "Pooling", "Dense", "Normalize"):
      raise ValueError(f"{modules_file}: module {module.get('path')!r} of type "
                       f"{module.get('type')!r} is not supported (Transformer, Pooling, Dense, "
                       "Normalize).")
    if kind in by_kind:
      raise ValueError(f"{modules_file}: more than one {kind} module.")
    by_kind[kind] = module
  for kind in ("Transformer", "Pooling"):
    if kind not in by_kind:
      raise ValueError(f"{modules_file}: no {kind} module.")

  pooling_file = directory / by_kind["Pooling"].get("path", "") / "config.json"
  pooling_raw = _read_json(pooling_file)
  modes = [name for name in ("pooling_mode_mean_tokens", "pooling_mode_cls_token",
                             "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                             "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
           if pooling_raw.get(name)]
  pooling = {("pooling_mode_mean_tokens",): "mean", ("pooling_mode_cls_token",): "first"}.get(
      tuple(modes))
  if pooling is None:
    raise ValueError(f"{pooling_file}: pooling modes {modes} are not supported; expected exactly "
                     "one of pooling_mode_mean_tokens, pooling_mode_cls_token.")

  transformer_dir = directory / by_kind["Transformer"].get("path", "")
  t5_config = config.encoder if config is not None else None
  t5_config, encoder_params = import_t5_encoder(transformer_dir, t5_config)

  projection_kernel = None
  projection_dim = t5_config.d_model
  if "Dense" in by_kind:
    dense_dir = directory / by_kind["Dense"].get("path", "")
    dense_file = dense_dir / "config.json"
    dense_raw = _read_json(dense_file)
    if dense_raw.get("bias", True):
      raise ValueError(f"{dense_file}: bias=true is not supported (GTR's Dense has no bias).")
    activation = str(dense_raw.get("activation_function", ""))
    if not activation.endswith("Identity"):
      raise ValueError(f"{dense_file}: activation_function={activation!r}; only the identity "
                       "is supported.")
    if dense_raw.get("in_features") != t5_config.d_model:
      raise ValueError(f"{dense_file}: in_features={dense_raw.get('in_features')} but the "
                       f"encoder has d_model={t5_config.d_model}.")
    projection_dim = int(dense_raw["out_features"])
    weight = _TensorStore(dense_dir).get(
        "linear.weight", (projection_dim, t5_config.d_model),
        f"{dense_file.name} (in_features={t5_config.d_model}, out_features={projection_dim})")
    projection_kernel = weight.T
  else:
    # No Dense module: an identity projection keeps one model structure for every checkpoint.
    projection_kernel = np.eye(t5_config.d_model, dtype=np.float32)
  normalize = "Normalize" in by_kind

  if config is None:
    config = DualEncoderConfig(encoder=t5_config, tower_sharing=tower_sharing, pooling=pooling,
                               projection_dim=projection_dim, normalize=normalize)
  else:
    found = {"pooling": pooling, "projection_dim": projection_dim, "normalize": normalize}
    for name, value in found.items():
      if getattr(config, name) != value:
        raise ValueError(f"{directory}: the checkpoint has {name}={value!r} but the given "
                         f"DualEncoderConfig has {name}={getattr(config, name)!r}.")
  return config, dual_encoder_params(config, encoder_params, projection_kernel)

