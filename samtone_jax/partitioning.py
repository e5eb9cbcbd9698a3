"""Device mesh, logical-axis rules and sharded initialisation.

The one place where logical axis names (used by the model on every parameter and key activation)
are mapped to the physical mesh axes `data` and `model`. Everything that creates sharded arrays
goes through `create_mesh`, `LOGICAL_AXIS_RULES` and `abstract_sharded` (the layout) /
`sharded_init` (the arrays); `replicated` and `InMesh` (a jitted function run with the mesh and
rules active) are the other sharding helpers.
"""

from collections.abc import Callable, Sequence
import contextlib
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)

# Logical axis name -> mesh axis (None: replicated). The model uses only these names.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA_AXIS),
    ("vocab", MODEL_AXIS),
    ("heads", MODEL_AXIS),
    ("mlp", MODEL_AXIS),
    ("kv", None),
    ("embed", None),
    ("length", None),
    ("relpos_buckets", None),
    ("projection", None),
    ("negatives", None),
    ("layers", None),  # the stacked-layer axis of `scan_layers` params
)


def resolve_mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
  """Fills a -1 entry of (data, model) so that data * model == num_devices.

  Raises:
    ValueError: if both are -1, or the sizes do not divide the device count.
  """
  if data == -1 and model == -1:
    raise ValueError("At most one of the mesh sizes (data, model) may be -1.")
  if data == -1:
    if num_devices % model:
      raise ValueError(f"model={model} does not divide the {num_devices} devices.")
    data = num_devices // model
  elif model == -1:
    if num_devices % data:
      raise ValueError(f"data={data} does not divide the {num_devices} devices.")
    model = num_devices // data
  if data * model != num_devices:
    raise ValueError(f"Mesh (data={data}, model={model}) needs {data * model} devices; "
                     f"{num_devices} are available.")
  return data, model


def create_mesh(data: int = -1, model: int = 1,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `(data, model)` mesh over `devices` (default: all devices, every process).

  Args:
    data: size of the data-parallel axis, or -1 to fill.
    model: size of the model-parallel axis, or -1 to fill.
    devices: the devices; defaults to `jax.devices()`. Topology-aware ordering via mesh_utils so
      that the `model` axis lies on neighbouring chips on TPU.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, model = resolve_mesh_shape(data, model, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh((data, model), devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topologies mesh_utils has no layout for (e.g. odd AOT topologies) keep the given order.
    device_array = np.asarray(devices).reshape(data, model)
  return Mesh(device_array, MESH_AXES)


def logical_to_sharding(logical_specs: Any, mesh: Mesh,
                        rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> Any:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def axis_rules(rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES):
  """Context manager activating the rules for `nn.with_logical_constraint` inside the model."""
  return nn.logical_axis_rules(list(rules))


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES):
  """`with mesh_context(mesh):` activates both the mesh and the logical axis rules.

  Uses `jax.set_mesh` (`with mesh:` is deprecated in JAX 0.10); flax's logical constraints resolve
  against it.
  """
  with jax.set_mesh(mesh), axis_rules(rules):
    yield


def abstract_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args,
                     rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> Any:
  """What `sharded_init(init_fn, mesh, *args)` creates, without creating it.

  `init_fn(*args)` is only shape-evaluated (args may be `jax.ShapeDtypeStruct`s); its logical
  specs are mapped to mesh shardings.

  Returns:
    The unboxed variables as `jax.ShapeDtypeStruct` leaves, each with its NamedSharding.
  """
  with mesh_context(mesh, rules):
    boxed = jax.eval_shape(init_fn, *args)
  shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, *args,
                 rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> tuple[Any, Any]:
  """Initialises a pytree directly into its sharded layout; nothing unsharded is ever built.

  `init_fn(*args)` returns variables whose leaves may be `nn.LogicallyPartitioned` (from
  `nn.with_logical_partitioning`); their shardings come from `abstract_sharded`, and `init_fn`
  is then run under `jax.jit(out_shardings=...)`.

  Returns:
    (variables, shardings): unboxed variables and a same-structured tree of NamedShardings.
  """
  shardings = jax.tree.map(lambda a: a.sharding,
                           abstract_sharded(init_fn, mesh, *args, rules=rules))
  with mesh_context(mesh, rules):
    variables = jax.jit(init_fn, out_shardings=shardings)(*args)
  return nn.meta.unbox(variables), shardings


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of an input array of rank `ndim` whose leading axis is the batch."""
  return NamedSharding(mesh, P(DATA_AXIS, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of an array every device holds whole (scalars, small optimizer state)."""
  return NamedSharding(mesh, P())


class InMesh:
  """A jitted function that is traced, called and lowered with `mesh` and the logical axis rules
  active (the model's logical sharding constraints resolve against them; `jax.set_mesh` must be
  entered outside of `jax.jit`, hence this wrapper rather than a context inside the function).

  `InMesh(f, mesh)(*args)` and `InMesh(f, mesh).lower(*args)` behave like `f(*args)` and
  `f.lower(*args)`.
  """

  def __init__(self, jitted: Any, mesh: Mesh):
    self.jitted = jitted
    self.mesh = mesh

  def __call__(self, *args):
    with mesh_context(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with mesh_context(self.mesh):
      return self.jitted.lower(*args)
