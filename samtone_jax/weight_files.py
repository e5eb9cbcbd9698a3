"""Reading tensors from Hugging Face / sentence-transformers weight files: file I/O only.

`TensorStore(directory)` looks tensors up by name in one checkpoint directory holding
`model.safetensors`, a sharded `model.safetensors.index.json`, or a PyTorch `pytorch_model.bin`
(its index too), reading only the tensors asked for. safetensors files are read with the
`safetensors` library (>= 0.8: its numpy reader handles bfloat16 and validates the header against
the file size, so a truncated file or a header that lies about its length is refused); .bin files
need torch, imported only then. Every error names the file and the tensor.

Model code (`models/hf_import.py`) maps the names and layouts; this module never builds params.
"""

import json
import os
import pathlib
from typing import Any

import numpy as np

PathLike = str | os.PathLike

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def local_path(path: PathLike) -> pathlib.Path:
  """The path as a local `pathlib.Path`; remote URLs are refused with what to do instead.

  Weight files are read with seeks into local files (a `gs://` path given to pathlib would
  silently become a wrong local path).
  """
  text = os.fspath(path)
  if "://" in text and not text.startswith("file://"):
    raise ValueError(f"{text}: weight import reads local directories only; copy the checkpoint "
                     f"to local disk first (e.g. `gsutil -m cp -r {text} /tmp/`) and pass that path.")
  return pathlib.Path(text.removeprefix("file://"))


def read_json(path: pathlib.Path) -> Any:
  """The parsed JSON file; errors name the file (and line)."""
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file.")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}.") from e


class _SafetensorsFile:
  """The tensors of one safetensors file: shapes from the header, data read on demand."""

  def __init__(self, file: pathlib.Path):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self.file = file
    try:
      # Opening parses and validates the whole header (offsets within the file, no overlaps).
      with safe_open(str(file), framework="numpy") as f:
        self.shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # pylint: disable=broad-except  (SafetensorError is not exported)
      raise ValueError(f"{file}: not a valid safetensors file ({e}); the file is truncated or "
                       "corrupt: download it again.") from e

  def read(self, name: str) -> np.ndarray:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    try:
      with safe_open(str(self.file), framework="numpy") as f:
        return f.get_tensor(name)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{self.file}: cannot read tensor {name} ({e}).") from e


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


class TensorStore:
  """Lazy name -> float32 numpy tensor lookup over one checkpoint directory, with precise errors."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    present = [name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not present:
      raise FileNotFoundError(
          f"{directory}: no weights; expected one of {', '.join(WEIGHT_FILES)}.")
    self.source = directory / present[0]  # safetensors preferred (the order of WEIGHT_FILES).
    if self.source.name.endswith(".index.json"):
      weight_map = read_json(self.source).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{self.source}: no 'weight_map' object.")
      self._file_of = {name: directory / file for name, file in weight_map.items()}
    else:
      self._file_of = None
    self._cache: dict[pathlib.Path, Any] = {}

  def _open(self, file: pathlib.Path) -> Any:
    """A `_SafetensorsFile` or a torch state dict for `file`."""
    if file not in self._cache:
      if not file.is_file():
        raise FileNotFoundError(f"{self.source}: refers to {file.name}, which does not exist.")
      if file.name.endswith(".safetensors"):
        self._cache[file] = _SafetensorsFile(file)
      else:
        self._cache[file] = _torch_load(file)
    return self._cache[file]

  def names(self) -> set[str]:
    if self._file_of is not None:
      return set(self._file_of)
    opened = self._open(self.source)
    return set(opened.shapes if isinstance(opened, _SafetensorsFile) else opened)

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
    opened = self._open(file)
    if isinstance(opened, _SafetensorsFile):
      if name not in opened.shapes:
        raise KeyError(f"{self.source}: maps tensor {name} to {file.name}, which does not hold it.")
      shape = opened.shapes[name]
    else:
      shape = tuple(opened[name].shape)
    if shape != tuple(expected_shape):
      raise ValueError(f"{file}: tensor {name} has shape {shape} but {expects} expects "
                       f"{tuple(expected_shape)}.")
    if isinstance(opened, _SafetensorsFile):
      return np.asarray(opened.read(name), dtype=np.float32)
    return opened[name].detach().float().numpy()  # A torch tensor from a .bin file.
