#!/usr/bin/env python3
"""Compiles the real train step for a TPU topology on this (CPU) machine and reports its memory.

Compile before renting hardware: with `libtpu` installed (`pip install -e .[tpu-aot]`),
`jax.experimental.topologies` describes a pod slice (e.g. `v5e:4x4` = 16 v5e chips) without
having one, and XLA compiles the train step for it: the model, the sharded SamToNe loss, the
optimizer, the state and batch shardings of a real run. The per-chip memory of the compiled
program (arguments, outputs, temporaries) is compared with the chip's HBM.

  JAX_PLATFORMS=cpu python launch/aot_compile.py --topology=v5e:4x4 \
      --gin_file=gin/experiments/X.gin --gin.BATCH_SIZE=512

Same gin files and `--gin.X=Y` overrides as `python -m samtone_jax.main`. The library is
`samtone_jax.aot`; this file is its command line. Exits with status 1
and a "does not fit" message when the step needs more memory than the chip has, so a launch
script (or CI) can refuse a configuration before a pod is created.
"""

from collections.abc import Sequence
import json
import os
import sys

# Nothing here runs on an accelerator: keep JAX (and TensorFlow, via seqio) off TPUs and GPUs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compiling needs no TPU, so several compiles (tests, the memory benchmark) may run at once;
# without this libtpu allows one process per machine (/tmp/libtpu_lockfile).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # pylint: disable=g-import-not-at-top

from samtone_jax import aot  # pylint: disable=g-import-not-at-top
from samtone_jax import cli  # pylint: disable=g-import-not-at-top

TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology to compile for, e.g. v5e:4x4, v4:2x2x2, v5p:4x4x8, v6e:4x4.")
JSON_OUTPUT = flags.DEFINE_string(
    "json_output", None, "Also write the memory report (and whether it fits) to this JSON file.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"Unexpected arguments: {argv[1:]}")
  if not TOPOLOGY.value:
    raise SystemExit("--topology is required, e.g. --topology=v5e:4x4")
  try:
    aot.chip_generation(TOPOLOGY.value)
  except ValueError as e:
    raise SystemExit(str(e)) from e
  cli.setup_from_flags()
  report, batch_size = aot.compile_configured(TOPOLOGY.value)
  print(report.summary(), flush=True)
  if JSON_OUTPUT.value:
    with open(JSON_OUTPUT.value, "w") as f:
      json.dump(dict(report.to_json(), batch_size=batch_size), f, indent=2)
  if not report.fits:
    print(aot.does_not_fit_message(report, batch_size), file=sys.stderr, flush=True)
    sys.exit(1)
  print("fits", flush=True)


if __name__ == "__main__":
  cli.run(main)
