"""Ahead-of-time compilation of the real train step for TPU topologies, and its per-chip memory.

Compile before renting hardware: with `libtpu` installed (`pip install -e .[tpu-aot]`),
`jax.experimental.topologies` describes a pod slice (e.g. `v5e:4x4` = 16 v5e chips) without
having one, and XLA compiles the train step for it: the model, the sharded SamToNe loss, the
optimizer, the state and batch shardings of a real run (`train_step.build`, the step the trainer
runs). `compile_train_step` returns a `MemoryReport` (arguments, outputs, temporaries per chip vs
the chip's HBM); `compile_configured` does it for the run the parsed gin config describes.

`launch/aot_compile.py` is the command-line tool over this module; the tests and
`benchmarks/aot_memory.py` use it too.
"""

import dataclasses
import os
import re
import time
from typing import Any

import jax
from jax.experimental import topologies
import numpy as np

from samtone_jax import errors
from samtone_jax import gin_config
from samtone_jax import losses
from samtone_jax import model_kinds
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as train_step_lib


# Compiling needs no TPU, so several compiles (tests, the memory benchmark) may run at once;
# without this libtpu allows one process per machine (/tmp/libtpu_lockfile).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GIB = 1024**3
# HBM per chip, by the TPU generation that starts a topology name ("v5e:4x4" -> v5e).
HBM_BYTES_PER_CHIP = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
MEGACORE = ("v4", "v5p")


# XLA's own refusals on TPU, in two forms: an early check when the temporaries alone exceed the
# chip's HBM, and buffer assignment running out of HBM for everything together.
_XLA_TEMPS_OOM = re.compile(r"memory required for HLO temporaries \(([0-9.]+)([KMGT])\) exceeds "
                            r"available HBM \(([0-9.]+)([KMGT])\)")
_XLA_HBM_OOM = re.compile(r"Ran out of memory in memory space hbm\. Used ([0-9.]+)([KMGT]) of "
                          r"([0-9.]+)([KMGT]) hbm")
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def xla_hbm_refusal(message: str) -> tuple[str, int, bool] | None:
  """Parses XLA's "does not fit in HBM" compile errors.

  Returns:
    None for any other error, else (the matched text, bytes, whether those bytes are the
    temporaries alone (True) or everything XLA had placed when it ran out (False)).
  """
  for pattern, temporaries_only in ((_XLA_TEMPS_OOM, True), (_XLA_HBM_OOM, False)):
    match = pattern.search(message)
    if match:
      return match.group(0), int(float(match.group(1)) * _UNITS[match.group(2)]), temporaries_only
  return None


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-chip memory of the compiled SPMD train step (every chip runs the same program).

  The total is what XLA must hold at the peak: arguments + outputs - donated (aliased) buffers +
  temporaries + generated code. When XLA itself refuses the program (its early check: the
  temporaries alone exceed the chip; or buffer assignment running out of HBM), `compile_error`
  holds its message, `argument_bytes` the per-chip size of the sharded inputs, `temp_bytes` the
  temporaries it asked for (or what it had placed beyond the arguments when it ran out), and the
  other terms are 0: the total is then a lower bound.
  """

  topology: str
  num_chips: int
  mesh_shape: tuple[int, int]
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  generated_code_bytes: int
  hbm_bytes: int
  compile_seconds: float
  compile_error: str | None = None

  @property
  def total_bytes(self) -> int:
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes +
            self.generated_code_bytes)

  @property
  def fits(self) -> bool:
    return self.compile_error is None and self.total_bytes <= self.hbm_bytes

  def summary(self) -> str:
    gib = lambda b: f"{b / GIB:.2f} GiB"
    header = (f"topology {self.topology}: {self.num_chips} chips, mesh (data, model) = "
              f"{self.mesh_shape}; compiled in {self.compile_seconds:.0f}s")
    if self.compile_error:
      return "\n".join([
          header, f"XLA refused the program: {self.compile_error}",
          f"per chip: arguments {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}",
          f"total at least {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM"])
    return "\n".join([
        header,
        f"per chip: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)}, "
        f"aliased (donated) {gib(self.alias_bytes)}, temporaries {gib(self.temp_bytes)}, "
        f"code {gib(self.generated_code_bytes)}",
        f"total {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM "
        f"({100 * self.total_bytes / self.hbm_bytes:.0f}%)"])

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), total_bytes=self.total_bytes, fits=self.fits)


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard of each)."""
  return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def chip_generation(topology: str) -> str:
  """"v5e:4x4" -> "v5e"; raises ValueError naming the known generations otherwise."""
  generation = topology.split(":")[0]
  if generation not in HBM_BYTES_PER_CHIP:
    raise ValueError(f"Unknown TPU generation in --topology={topology!r}; expected one of "
                     f"{sorted(HBM_BYTES_PER_CHIP)} followed by ':' and the chip grid, e.g. "
                     "v5e:4x4, v4:2x2x2, v5p:4x4x8.")
  return generation


def topology_devices(topology: str) -> list[jax.Device]:
  """The (compile-only) devices of a TPU topology such as `v5e:4x4` or `v4:4x4x4`."""
  # v4 and v5p chips have two TensorCores that JAX drives as one device (megacore), with the
  # chip's whole HBM; without this libtpu describes one device per core.
  kwargs = {"chip_config_name": "megacore"} if chip_generation(topology) in MEGACORE else {}
  return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)


def compile_train_step(topology: str, *, model_config: Any,
                       loss_config: losses.LossConfig,
                       optimizer_config: optimizers.OptimizerConfig, batch_size: int,
                       task_feature_lengths: dict[str, int], num_negatives: int = 0,
                       mesh_data: int = -1, mesh_model: int = 1,
                       chunks: train_step_lib.ChunkConfig = train_step_lib.ChunkConfig(),
                       prng_impl: str = train_step_lib.DEFAULT_PRNG_IMPL) -> MemoryReport:
  """Lowers and compiles the trainer's jitted train step for `topology`; reports its memory.

  Args:
    topology: e.g. "v5e:4x4".
    model_config, loss_config, optimizer_config: as for a real run; `model_config` is a
      DualEncoderConfig or a `seq2seq_model.EncoderDecoderModel` (SKILL; its loss is its own).
    batch_size: the global batch size B.
    task_feature_lengths: {"queries": Lq, "passages": Lp}, or {"inputs", "targets"} lengths
      for the encoder-decoder.
    num_negatives: hard negatives per query in the batch (0: none).
    mesh_data, mesh_model: mesh sizes as for `partitioning.create_mesh` (-1 fills).
    chunks: gradient caching / loss row chunking, as for a real run.
    prng_impl: the dropout keys' PRNG implementation (PRNG_IMPL), as for a real run.
  """
  devices = topology_devices(topology)
  mesh = partitioning.create_mesh(mesh_data, mesh_model, devices=devices)
  if batch_size % mesh.shape[partitioning.DATA_AXIS]:
    raise ValueError(f"Batch size {batch_size} is not divisible by the data axis "
                     f"({mesh.shape[partitioning.DATA_AXIS]} of {len(devices)} chips).")
  batch = model_kinds.of(model_config).batch_spec(batch_size, task_feature_lengths,
                                                  num_negatives=num_negatives)
  built = train_step_lib.build(model_config, loss_config, optimizer_config, mesh, batch, chunks)
  batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=built.batch_shardings[k])
                    for k, v in batch.items()}
  rng = train_step_lib.rng_spec(prng_impl)
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=built.rng_sharding)
  common = dict(
      topology=topology, num_chips=len(devices),
      mesh_shape=(mesh.shape[partitioning.DATA_AXIS], mesh.shape[partitioning.MODEL_AXIS]),
      hbm_bytes=HBM_BYTES_PER_CHIP[chip_generation(topology)])
  start = time.time()
  lowered = built.train_step.lower(built.abstract_state, batch_abstract, rng)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    refusal = xla_hbm_refusal(str(e))
    if refusal is None:
      raise
    text, needed, temporaries_only = refusal
    arguments = per_chip_bytes((built.abstract_state, batch_abstract, rng))
    return MemoryReport(
        argument_bytes=arguments, output_bytes=0, alias_bytes=0, generated_code_bytes=0,
        temp_bytes=needed if temporaries_only else max(needed - arguments, 0),
        compile_seconds=time.time() - start, compile_error=text, **common)
  stats = compiled.memory_analysis()
  return MemoryReport(
      argument_bytes=stats.argument_size_in_bytes, output_bytes=stats.output_size_in_bytes,
      alias_bytes=stats.alias_size_in_bytes, temp_bytes=stats.temp_size_in_bytes,
      generated_code_bytes=stats.generated_code_size_in_bytes,
      compile_seconds=time.time() - start, **common)


def does_not_fit_message(report: MemoryReport, batch_size: int) -> str:
  generation = chip_generation(report.topology)
  # After XLA's own HBM check the need is a lower bound; the summary says so.
  return (f"does not fit: needs {report.total_bytes / GIB:.2f} GiB per chip, {generation} has "
          f"{report.hbm_bytes / GIB:.0f} GiB; try a smaller batch (--gin.BATCH_SIZE="
          f"{max(batch_size // 2, 1)}), rematerialisation (T5Config.remat=True; "
          "remat_policy='full' keeps the least), more model "
          f"parallelism (mesh model axis > {report.mesh_shape[1]}), bfloat16 activations "
          "(T5Config.dtype='bfloat16'), or a larger topology.")


def compile_configured(topology: str) -> tuple[MemoryReport, int]:
  """Compiles the configured run's train step for `topology`; returns (report, batch size)."""
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  # The bindings a real run gets, so that this compiles exactly that run's step.
  args = gin_config.configured_arguments(trainer.train,
                                         required=("model", "loss", "optimizer", "data"))
  data = args["data"]
  try:  # what the trainer refuses, refused here too, as one message (errors.ConfigError)
    model_kinds.of(args["model"]).check_options(loss=args["loss"], chunks=args["chunks"])
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  mesh_data, mesh_model = args["mesh_shape"]
  report = compile_train_step(
      topology, model_config=args["model"], loss_config=args["loss"],
      optimizer_config=args["optimizer"], batch_size=data.batch_size,
      task_feature_lengths=dict(data.task_feature_lengths),
      num_negatives=trainer.num_negatives(data, args["loss"]),
      mesh_data=mesh_data, mesh_model=mesh_model, chunks=args["chunks"],
      prng_impl=args["prng_impl"])
  return report, data.batch_size
