"""A dual encoder's parameters as a t5x checkpoint: the initial checkpoint of `python -m t5x.train`.

  EXPORT_DIR/checkpoint_0/state    t5x's orbax format (an OCDBT PyTree, what t5x's own
                                   `OrbaxCheckpointManagerInterface` writes):
                                   {"target": {"model": DualEncoder params}, "state": {"step": 0}}

The tree under "target" is the one `samtone_jax.t5x_model.DualEncoderModel` trains, in the layer
layout of the configured model (`T5Config.scan_layers`). This module does not import t5x, so the
converter runs without it.

Why a checkpoint file and not an initial-parameters hook in the t5x adapter: t5x builds its train
state inside `jax.eval_shape` and a pjit-ed init (`utils.TrainStateInitializer`), where reading
files is not possible, and every t5x user already starts fine-tuning from
`INITIAL_CHECKPOINT_PATH`; a converted checkpoint fits that path, keeps t5x's restore (sharding,
dtype casting, assignment maps) and is converted once, not at every start.

What it does not hold: optimizer state. Our checkpoints keep an optax state and public weights
none, neither of which is t5x's Adafactor state, so t5x creates a fresh one: the run includes
`gin/t5x/initial_checkpoint.gin`, t5x's documented recipe for restoring parameters only
(`assignment_map` drops `state/param_states`, `fallback_to_scratch` initialises them). For the
same reason the step is 0: t5x's Adafactor derives its second-moment decay from the step
(`1 - (step + 1) ** -0.8`), which assumes moments that started at step 0, and the learning-rate
warm-up counts from it too. A learned temperature ("loss" params) is not carried over either: it
starts from the t5x run's `LossConfig.temperature`.
"""

import pathlib
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from samtone_jax.models.config import DualEncoderConfig

STEP = 0
STEP_PREFIX = "checkpoint"  # t5x's step directories: checkpoint_<step>
STATE_ITEM = "state"


def step_dir(export_dir: str | pathlib.Path) -> pathlib.Path:
  """The directory to pass as t5x's INITIAL_CHECKPOINT_PATH."""
  return pathlib.Path(export_dir) / f"{STEP_PREFIX}_{STEP}"


def state_dict(params: dict[str, Any]) -> dict[str, Any]:
  """The t5x train-state dict (`FlaxOptimTrainState.state_dict()` without optimizer state)."""
  return {"target": {"model": params}, "state": {"step": np.int32(STEP)}}


def write(directory: pathlib.Path, config: DualEncoderConfig, params: dict[str, Any],
          sentencepiece_model: bytes | None, max_seq_lengths: dict[str, int]) -> None:
  """Writes `directory/checkpoint_0/state` as t5x's orbax checkpoint manager does.

  Args:
    directory: an empty local directory.
    config: the dual encoder's architecture (unused: the tree already has its layout).
    params: the `DualEncoder` params collection (host or device arrays, float32 kept as is).
    sentencepiece_model, max_seq_lengths: unused (a checkpoint holds no tokenizer); present so
      every format writer has one signature.
  """
  del config, sentencepiece_model, max_seq_lengths
  options = ocp.CheckpointManagerOptions(step_prefix=STEP_PREFIX, create=True,
                                         enable_async_checkpointing=False)
  # use_ocdbt=True: t5x's OrbaxCheckpointManagerInterface reads and writes that layout.
  with ocp.CheckpointManager(
      directory, options=options,
      item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(use_ocdbt=True)}) as manager:
    manager.save(STEP, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeSave(state_dict(params))}), force=True)
    manager.wait_until_finished()


USAGE = """## Usage

A t5x checkpoint of `samtone_jax.t5x_model.DualEncoderModel` (parameters only, step 0). Start a
t5x run from it with the same model gin files it was converted with, and
`gin/t5x/initial_checkpoint.gin` (t5x creates a fresh optimizer state; docs/t5x.md):

```sh
python -m t5x.train --gin_file=gin/t5x/msmarco.gin --gin_file=gin/t5x/initial_checkpoint.gin \\
  --gin.MODEL_DIR=\\"/path/to/t5x_run\\" --gin.INITIAL_CHECKPOINT_PATH=\\"{path}/checkpoint_0\\"
```

samtone_jax's own commands (`samtone-evaluate`, `samtone-encode`, `samtone-export`,
`INITIAL_CHECKPOINT_PATH` of our trainer) read it too.
"""
