"""Multi-host runs on one machine: 2 processes x 4 CPU devices (jax.distributed, gloo) vs 1 x 8.

Each process is a subprocess with its own XLA_FLAGS device count; they meet at a coordinator on
localhost. Checked: `distributed.initialize` wires the processes into one 8-device system whose
collectives give the numpy answer, the start-up logic picks the right case, and (with the real
trainer, through `python -m samtone_jax.main`) two processes train and evaluate exactly like one,
and meshes (4, 2) and (2, 4) train like (8, 1).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from samtone_jax import distributed


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def subprocess_env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  return env


def run_processes(commands: list[list[str]], num_devices: int | list[int], timeout: float = 900,
                  extra_env: dict[str, str] | None = None) -> list[str]:
  """Starts all commands at once (they wait for each other), returns their stdouts.

  `num_devices`: CPU devices of every process, or one count per command.
  """
  counts = num_devices if isinstance(num_devices, list) else [num_devices] * len(commands)
  procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(subprocess_env(count), **(extra_env or {})))
           for cmd, count in zip(commands, counts)]
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=timeout)
      assert proc.returncode == 0, f"process failed:\n{err[-4000:]}"
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return outputs


# A global [8, 3] array, rows 4*i..4*i+3 from process i, sharded over all 8 devices; its
# all-reduced column sums and a global matmul must equal numpy's on the whole array.
COLLECTIVES_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from samtone_jax import distributed
    distributed.initialize(coordinator_address=sys.argv[1], process_count=int(sys.argv[2]),
                           process_index=int(sys.argv[3]))
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from samtone_jax import partitioning
    mesh = partitioning.create_mesh(data=-1, model=1)
    full = np.arange(24, dtype=np.float32).reshape(8, 3) ** 1.5
    rows = 8 // jax.process_count()
    local = full[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data", None)), local)
    gram = jax.jit(lambda a: a.T @ a, out_shardings=NamedSharding(mesh, P()))(x)
    colsum = jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, P()))(x)
    print(json.dumps(dict(process_index=jax.process_index(), process_count=jax.process_count(),
                          devices=jax.device_count(), local_devices=jax.local_device_count(),
                          gram=np.asarray(gram).tolist(), colsum=np.asarray(colsum).tolist())))
""")


def test_two_processes_form_one_eight_device_system(tmp_path):
  script = tmp_path / "collectives.py"
  script.write_text(COLLECTIVES_SCRIPT)
  address = f"localhost:{free_port()}"
  outputs = run_processes([[sys.executable, str(script), address, "2", str(i)] for i in range(2)],
                          num_devices=4)
  full = np.arange(24, dtype=np.float32).reshape(8, 3) ** 1.5
  for index, out in enumerate(outputs):
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["process_index"], result["process_count"]) == (index, 2)
    assert (result["devices"], result["local_devices"]) == (8, 4)
    np.testing.assert_allclose(result["gram"], full.T @ full, rtol=1e-6)
    np.testing.assert_allclose(result["colsum"], full.sum(0), rtol=1e-6)


def test_single_process_is_a_no_op(monkeypatch):
  # Under pytest JAX_PLATFORMS=cpu, so even TPU env vars do not make this a TPU run.
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  distributed.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  assert (jax.process_count(), jax.device_count()) == (1, 8)
  assert distributed.is_chief()


@pytest.mark.parametrize("env, expected", [
    ({"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "w0,w1"}, False),
    ({"JAX_PLATFORMS": "tpu", "TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
    ({"JAX_PLATFORMS": "", "TPU_ACCELERATOR_TYPE": "v5litepod-16"}, True),
    ({"JAX_PLATFORMS": ""}, False),
])
def test_cloud_tpu_detection(monkeypatch, env, expected):
  for name in distributed._TPU_ENV_VARS:  # pylint: disable=protected-access
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  # This machine has no TPU chips (/dev/accel*, /dev/vfio/N); only the environment decides.
  assert distributed.on_cloud_tpu_vm() == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="localhost:1234"), "needs all of --coordinator_address"),
    (dict(coordinator_address="localhost:1234", process_count=2), "needs all of"),
    (dict(coordinator_address="localhost:1234", process_count=2, process_index=2),
     "--process_index=2 is outside [0, 2)"),
])
def test_incomplete_multiprocess_flags_fail_clearly(kwargs, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
    distributed.initialize(**kwargs)


# --- The real entry point: 2 processes x 4 devices train like 1 process x 8 --------------------

# The demo task without its shuffle buffer: host i reads examples i, i+2, ... in file order, so
# the two hosts' local batches together hold exactly the rows of the one-host global batch (a
# shuffle buffer per host shard would give each host count its own order).
UNSHUFFLED_TASKS_MODULE = textwrap.dedent("""
    import functools
    from samtone_jax.tasks import all as _all  # registers the demo task and vocabulary
    from samtone_jax.tasks import beir, demo, sources, vocab
    source = sources.examples_source(
        {"train": functools.partial(demo.train_pairs, demo.DEMO_DIR)})
    beir.register_pairs_task("demo_manpages_unshuffled", source, vocab.demo_vocabulary(),
                             shuffle_buffer_size=None)
""")


def main_command(model_dir, *flags: str) -> list[str]:
  return [sys.executable, "-m", "samtone_jax.main",
          "--gin_file=experiments/demo_samtone.gin", f"--gin.MODEL_DIR='{model_dir}'",
          "--gin.MIXTURE_OR_TASK_NAME='demo_manpages_unshuffled'",
          "--gin.trainer.DataConfig.tasks_module='unshuffled_demo_tasks'",
          "--gin.TRAIN_STEPS=5", "--gin.BATCH_SIZE=16",
          "--gin.TASK_FEATURE_LENGTHS={'queries': 8, 'passages': 16}",
          "--gin.EVAL_TASKS=['demo_manpages_test']",
          "--gin.trainer.LoopConfig.log_period=1", "--gin.trainer.LoopConfig.checkpoint_period=5",
          # Rows sit at different global positions with 1 and 2 hosts (host i holds examples
          # i, i+2, ...), and a dropout mask is keyed by the example's global row
          # (dual_encoder.example_dropout_keys), not by its content: no dropout here.
          "--gin.DROPOUT_RATE=0.0", *flags]


def logged_metrics(model_dir, kind: str) -> list[dict]:
  with open(model_dir / "metrics.jsonl") as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def logged_losses(model_dir) -> list[float]:
  return [r["loss"] for r in logged_metrics(model_dir, "train")]


def checkpoint_params(model_dir, step: int) -> dict:
  """The params of MODEL_DIR/checkpoints/<step> as numpy arrays (no devices involved)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = str(model_dir / "checkpoints" / str(step) / "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path)
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))[
      "params"]


def test_two_processes_train_like_one_through_main(tmp_path):
  (tmp_path / "unshuffled_demo_tasks.py").write_text(UNSHUFFLED_TASKS_MODULE)
  single, multi = tmp_path / "one_process", tmp_path / "two_processes"
  address = f"localhost:{free_port()}"
  multihost = lambda i: [f"--coordinator_address={address}", "--process_count=2",
                         f"--process_index={i}"]
  # All three processes at once: the 1 x 8 reference beside the 2 x 4 run.
  outputs = run_processes(
      [main_command(single), main_command(multi, *multihost(0)),
       main_command(multi, *multihost(1))], num_devices=[8, 4, 4],
      extra_env={"PYTHONPATH": str(tmp_path)})
  assert all("Finished at step 5" in out for out in outputs)
  reference = logged_losses(single)
  assert len(reference) == 5 and np.all(np.isfinite(reference))
  # Only process 0 writes metrics: one line per step, not two.
  np.testing.assert_allclose(logged_losses(multi), reference, rtol=1e-5)
  # The retrieval evaluation at the end (corpus encoded by both hosts) agrees too.
  [reference_eval], [multi_eval] = logged_metrics(single, "eval"), logged_metrics(multi, "eval")
  assert set(multi_eval) == set(reference_eval) and "demo_manpages_test/mrr@10" in reference_eval
  for name, value in reference_eval.items():
    if "/" in name:  # "<eval set>/<metric>"
      np.testing.assert_allclose(multi_eval[name], value, rtol=1e-5, err_msg=name)
  import jax  # pylint: disable=g-import-not-at-top
  reference_params = checkpoint_params(single, 5)
  params = checkpoint_params(multi, 5)
  assert jax.tree.structure(params) == jax.tree.structure(reference_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params,
               reference_params)


# --- Mesh shapes: the same step on (8, 1), (4, 2) and (2, 4) meshes -----------------------------

TINY_LENGTHS = {"queries": 6, "passages": 10}
TINY_BATCH = 16
NUM_STEPS = 5


def tiny_configs():
  from samtone_jax import losses  # pylint: disable=g-import-not-at-top
  from samtone_jax import optimizers  # pylint: disable=g-import-not-at-top
  from samtone_jax.models import config as model_config_lib  # pylint: disable=g-import-not-at-top
  # Heads, d_ff and vocab divisible by 4 so that every mesh shards them over `model`.
  encoder = model_config_lib.T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                      num_heads=4, dropout_rate=0.1)
  model = model_config_lib.DualEncoderConfig(encoder=encoder, tower_sharing="ade_ste",
                                             projection_dim=8)
  loss = losses.LossConfig(temperature=0.05, same_tower_negatives=True, bidirectional=True)
  optimizer = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-2, warmup_steps=2,
                                         decay="constant")
  return model, loss, optimizer


def synthetic_batches(num_steps: int) -> list[dict[str, np.ndarray]]:
  """Random token batches with padding tails and a few duplicate query ids."""
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(num_steps):
    batch = {}
    for name, length in TINY_LENGTHS.items():
      tokens = rng.integers(1, 128, size=(TINY_BATCH, length)).astype(np.int32)
      lengths = rng.integers(2, length + 1, size=TINY_BATCH)
      tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
      batch[name] = tokens
    batch["query_ids"] = rng.integers(0, TINY_BATCH - 2, size=TINY_BATCH).astype(np.int32)
    batch["passage_ids"] = np.arange(TINY_BATCH, dtype=np.int32)
    batches.append(batch)
  return batches


def train_on_mesh(mesh_shape: tuple[int, int]):
  """5 steps of the real jitted train step on a (data, model) mesh; (losses, final params)."""
  import jax  # pylint: disable=g-import-not-at-top
  from samtone_jax import partitioning  # pylint: disable=g-import-not-at-top
  from samtone_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
  model, loss, optimizer = tiny_configs()
  mesh = partitioning.create_mesh(*mesh_shape)
  spec = train_step_lib.batch_spec(TINY_BATCH, TINY_LENGTHS)
  built = train_step_lib.build(model, loss, optimizer, mesh, spec)
  state = built.init_state(jax.random.PRNGKey(0))
  rng = jax.device_put(jax.random.PRNGKey(1), built.rng_sharding)
  losses = []
  for local_batch in synthetic_batches(NUM_STEPS):
    batch = train_step_lib.as_global_batch(local_batch, built.batch_shardings)
    state, metrics = built.train_step(state, batch, rng)
    metrics = jax.device_get(metrics)
    losses.append(float(metrics["loss_sum"]) / float(metrics["num_examples"]))
  return np.array(losses), jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.fixture
def fast_compile():
  """Compile time dominates these tiny steps; XLA's optimisations are not what is tested."""
  import jax  # pylint: disable=g-import-not-at-top
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def test_model_parallel_meshes_reproduce_data_parallel_training(fast_compile):
  reference_losses, reference_params = train_on_mesh((8, 1))
  assert np.all(np.isfinite(reference_losses))
  # The loss moves: the test would be vacuous if training did nothing.
  assert abs(reference_losses[-1] - reference_losses[0]) > 1e-3
  for mesh_shape in [(4, 2), (2, 4)]:
    losses, params = train_on_mesh(mesh_shape)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-6,
                               err_msg=f"mesh {mesh_shape}")
    import jax  # pylint: disable=g-import-not-at-top
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 params, reference_params)


# --- Preemption: SIGTERM to one host stops both at the same step -------------------------------

def test_sigterm_to_one_process_checkpoints_both_at_one_step(tmp_path):
  """JAX's preemption sync point: both hosts leave the loop at one step and save together.

  With per-process SIGTERM flags the signalled host would enter the (collective) checkpoint save
  while the other entered the next (collective) train step: a hang, here the timeout.
  """
  import signal  # pylint: disable=g-import-not-at-top
  (tmp_path / "unshuffled_demo_tasks.py").write_text(UNSHUFFLED_TASKS_MODULE)
  model_dir = tmp_path / "run"
  address = f"localhost:{free_port()}"
  train_steps = 10_000  # far more than run before the signal: only a preemption ends it
  commands = [main_command(model_dir, f"--coordinator_address={address}", "--process_count=2",
                           f"--process_index={i}", f"--gin.TRAIN_STEPS={train_steps}",
                           "--gin.EVAL_TASKS=[]", "--gin.config.T5Config.num_layers=1",
                           "--gin.trainer.LoopConfig.checkpoint_period=100000")
              for i in range(2)]
  logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env=dict(subprocess_env(4), PYTHONPATH=str(tmp_path)))
           for cmd, log in zip(commands, logs)]
  try:
    # Process 0 prints a line per step; SIGTERM the other host once training runs.
    chief_lines = []
    for line in procs[0].stdout:
      chief_lines.append(line)
      if line.startswith("step 2/"):
        break
    assert chief_lines and chief_lines[-1].startswith("step 2/"), (
        "".join(chief_lines) + (tmp_path / "process0.log").read_text()[-4000:])
    procs[1].send_signal(signal.SIGTERM)
    outputs = []
    for index, proc in enumerate(procs):
      out, _ = proc.communicate(timeout=120)
      if index == 0:
        out = "".join(chief_lines) + out
      log = (tmp_path / f"process{index}.log").read_text()
      assert proc.returncode == 0, f"process {index}:\n{out}\n{log[-4000:]}"
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
    for log in logs:
      log.close()
  finished = []
  for out in outputs:
    [line] = [l for l in out.splitlines() if l.startswith("Finished at step")]
    assert "(preempted)" in line, out
    finished.append(int(line.split()[3]))
  # Both hosts stopped at one step, after the signal and long before the end.
  assert finished[0] == finished[1] and 2 <= finished[0] < train_steps, finished
  step = finished[0]
  assert all(f"Saved checkpoint step {step}:" in out for out in outputs), outputs
  assert sorted(os.listdir(model_dir / "checkpoints")) == [str(step)]
  # The chief logged every step up to there, and the checkpoint restores with finite params.
  assert [r["step"] for r in logged_metrics(model_dir, "train")] == list(range(1, step + 1))
  import jax  # pylint: disable=g-import-not-at-top
  params = checkpoint_params(model_dir, step)
  leaves = jax.tree.leaves(params)
  assert leaves and all(np.isfinite(x).all() for x in leaves)
