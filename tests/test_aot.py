"""launch/aot_compile.py (over samtone_jax.aot): the real train step compiled for TPU topologies on this CPU machine.

Runs the script as a user does (a subprocess: libtpu's topology plugin and absl flags stay out of
the test process) with the repository's gin files. The per-chip argument memory is checked
against the parameter and optimizer-state sizes counted from the model's formula, and a
configuration larger than a v5e chip must fail with the stated message.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "aot_compile.py"
GIB = 1024**3
SAMTONE_RUN = ["--gin_file=architectures/sde.gin", "--gin_file=losses/samtone.gin",
               "--gin_file=runs/pretrain.gin", "--gin.MIXTURE_OR_TASK_NAME='unused_by_aot'",
               "--gin.TASK_FEATURE_LENGTHS={'queries': 64, 'passages': 256}"]


def run_aot(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
  report = tmp_path / "report.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)  # the topology's devices are not host devices
  proc = subprocess.run([sys.executable, str(SCRIPT), *args, f"--json_output={report}"],
                        capture_output=True, text=True, env=env, check=False, timeout=3600)
  assert report.exists(), proc.stderr[-3000:]
  return proc, json.loads(report.read_text())


def t5_encoder_params(vocab: int, d: int, d_ff: int, layers: int, heads: int, d_kv: int,
                      buckets: int = 32) -> int:
  """Parameter count of a T5 1.1 encoder (gated-GELU, no biases) with its token embedder."""
  attention = 4 * d * heads * d_kv  # q, k, v, o
  mlp = 3 * d * d_ff  # wi_0, wi_1, wo
  norms = 2 * d
  return vocab * d + layers * (attention + mlp + norms) + d + buckets * heads


# A 128-wide encoder: every matrix has both dimensions >= Adafactor's min_dim_size_to_factor
# (128), so its optimizer state is factored as in the real sizes. The real-size compile (GTR-base,
# batch 512, v5e 4x4: 2 minutes of CPU) is a benchmark, benchmarks/aot_memory.py, whose recorded
# table is in benchmarks/README.md; this test runs the same command path on the same topology.
D_MODEL, D_FF, HEADS, D_KV, LAYERS = 128, 256, 4, 32, 2
SMALL_WIDE = [f"--gin.config.T5Config.d_model={D_MODEL}", f"--gin.config.T5Config.d_ff={D_FF}",
              f"--gin.config.T5Config.num_heads={HEADS}", f"--gin.config.T5Config.d_kv={D_KV}",
              f"--gin.config.T5Config.num_layers={LAYERS}",
              f"--gin.config.DualEncoderConfig.projection_dim={D_MODEL}"]


def test_samtone_batch_512_fits_v5e_4x4_with_the_pod_configuration(tmp_path):
  # Layers scanned with remat (gin/models/scan_remat.gin), the configuration recommended for
  # pods: one layer body compiled, not one per layer.
  proc, report = run_aot(tmp_path, "--topology=v5e:4x4", "--gin_file=models/tiny.gin",
                         "--gin_file=models/scan_remat.gin", *SAMTONE_RUN, *SMALL_WIDE,
                         "--gin.BATCH_SIZE=512")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report["num_chips"] == 16 and tuple(report["mesh_shape"]) == (16, 1)
  assert report["batch_size"] == 512 and report["hbm_bytes"] == 16 * GIB
  # SDE: one tower, replicated on every chip (model axis 1), plus the projection.
  num_params = (t5_encoder_params(32128, D_MODEL, D_FF, LAYERS, HEADS, D_KV) +
                D_MODEL * D_MODEL)
  params_bytes = 4 * num_params
  # Arguments = params + Adafactor state (factored: a row and a column vector per matrix, so
  # well under 10% of the params) + this chip's 32 rows of the batch + step: all the
  # state lives on every chip.
  assert params_bytes <= report["argument_bytes"] <= 1.1 * params_bytes, (
      report["argument_bytes"], params_bytes)
  # The state is donated: the new state reuses the old one's buffers.
  assert report["alias_bytes"] >= params_bytes
  assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"] -
                                   report["alias_bytes"] + report["temp_bytes"] +
                                   report["generated_code_bytes"])
  assert 0 < report["temp_bytes"] and report["total_bytes"] < 16 * GIB and report["fits"]
  assert f"total {report['total_bytes'] / GIB:.2f} GiB of 16.00 GiB HBM" in proc.stdout


def test_too_big_for_v5e_fails_with_message(tmp_path):
  # A 2-layer encoder with a 2M x 2048 embedding: 16 GiB of float32 parameters alone.
  vocab, d_model = 2**21, 2048
  proc, report = run_aot(
      tmp_path, "--topology=v5e:2x2", "--gin_file=models/tiny.gin", *SAMTONE_RUN,
      "--gin.BATCH_SIZE=16", f"--gin.config.T5Config.vocab_size={vocab}",
      f"--gin.config.T5Config.d_model={d_model}")
  assert proc.returncode == 1
  assert report["argument_bytes"] >= 4 * vocab * d_model and not report["fits"]
  match = re.search(r"does not fit: needs ([0-9.]+) GiB per chip, v5e has 16 GiB; try ",
                    proc.stderr)
  assert match, proc.stderr[-3000:]
  np.testing.assert_allclose(float(match.group(1)), report["total_bytes"] / GIB, atol=0.005)


def test_unknown_topology_fails_clearly(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(SCRIPT), "--topology=v9x:4x4",
                         "--gin_file=models/tiny.gin"], capture_output=True, text=True, env=env,
                        check=False)
  assert proc.returncode != 0
  assert "Unknown TPU generation in --topology='v9x:4x4'" in proc.stderr


def test_both_forms_of_xla_hbm_refusal_are_read():
  """XLA refuses a program for HBM in two wordings (the matched parts as XLA wrote them in its
  errors for v5e here): an early check on the temporaries, and buffer assignment running out
  with everything placed (the second one used to escape as a traceback)."""
  from samtone_jax import aot  # pylint: disable=g-import-not-at-top
  early = ("RESOURCE_EXHAUSTED: ... memory required for HLO temporaries (29.31G) exceeds "
           "available HBM (15.75G) ...")
  late = ("tensorflow.tpu.CompilationResultProto='\\x08\\x08\\x12\\xc4JRan out of memory in "
          "memory space hbm. Used 15.80G of 15.75G hbm. Exceeded hbm capacity by 53.07M.")
  assert aot.xla_hbm_refusal(early) == (
      "memory required for HLO temporaries (29.31G) exceeds available HBM (15.75G)",
      int(29.31 * GIB), True)
  assert aot.xla_hbm_refusal(late) == (
      "Ran out of memory in memory space hbm. Used 15.80G of 15.75G hbm", int(15.80 * GIB), False)
  assert aot.xla_hbm_refusal("INVALID_ARGUMENT: something else") is None


def test_encoder_decoder_step_compiles_for_v5e_with_its_parameters_on_every_chip(tmp_path):
  """SKILL's encoder-decoder goes through the same AOT compile (the demo experiment, v5e:2x2).

  The reference parameter count is Hugging Face's T5ForConditionalGeneration of the same shape
  (T5 1.1: untied head, one relative-position table per stack; it equals ours): the per-chip
  arguments are those parameters in float32 (replicated, model axis 1), AdamW's two moments of the
  same size, the batch rows and the step, in TPU tile layouts.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  proc, report = run_aot(tmp_path, "--topology=v5e:2x2",
                         "--gin_file=experiments/skill_wordnet_demo.gin", "--gin.BATCH_SIZE=64")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report["num_chips"] == 4 and tuple(report["mesh_shape"]) == (4, 1)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=2100, d_model=64, d_ff=128, num_heads=4, num_layers=2, d_kv=16,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False))
  num_params = sum(p.numel() for p in hf.parameters())
  if hf.lm_head.weight is hf.shared.weight:
    # transformers 5 always ties the head to the embedding (T5 1.1 is marked by not scaling the
    # decoder output instead); ours is untied, as T5 1.1 was trained.
    num_params += hf.lm_head.weight.numel()
  state_bytes = 3 * 4 * num_params  # params + AdamW's mu and nu
  # Upper bound: TPU layouts pad each array's last two dims to (8, 128) tiles, which for this
  # d_model-64 model (vectors of 64, [64, 128] kernels, [32, 4] position tables) adds ~24%
  # (measured 1.24x; GTR-base's large matrices pad < 10%, see the test above).
  assert state_bytes <= report["argument_bytes"] <= 1.3 * state_bytes, (
      report["argument_bytes"], state_bytes)
