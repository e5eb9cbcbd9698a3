"""The model card (README.md) of an export: what was trained, on which step, and how it scored.

The run directory written by `trainer.train` holds everything: `config.gin` (the operative
config), `checkpoints/<step>/` and `metrics.jsonl` (one JSON object per event; eval events are
{"kind": "eval", "step": s, "<eval set>/<metric>": value, ...}).
"""

import dataclasses
import json
import os

from samtone_jax import io_utils
from samtone_jax.models.config import DualEncoderConfig


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
  """What a run recorded about one checkpoint.

  Attributes:
    step_dir: the checkpoints/<step> directory.
    step: the training step.
    config_gin: the run's config.gin text, or None when the run directory has none.
    eval_metrics: {"<eval set>/<metric>": value} evaluated at this step (empty when none was).
  """

  step_dir: str
  step: int | None
  config_gin: str | None
  eval_metrics: dict[str, float]


def checkpoint_record(step_dir: str) -> CheckpointRecord:
  """Reads the step, config.gin and eval metrics of the checkpoint in `step_dir`."""
  name = os.path.basename(step_dir.rstrip("/"))
  if any(io_utils.exists(os.path.join(step_dir, f)) for f in ("modules.json", "config.json")):
    # Public weights (a sentence-transformers or Hugging Face directory): no run, no step.
    return CheckpointRecord(step_dir, None, None, {})
  if name.startswith("checkpoint_"):  # t5x: MODEL_DIR/checkpoint_<step>.
    step = int(name[len("checkpoint_"):]) if name[len("checkpoint_"):].isdigit() else None
    run_dir = os.path.dirname(step_dir.rstrip("/"))
  else:  # samtone_jax: MODEL_DIR/checkpoints/<step>.
    step = int(name) if name.isdigit() else None
    run_dir = os.path.dirname(os.path.dirname(step_dir.rstrip("/")))
  config_gin = None
  config_path = os.path.join(run_dir, "config.gin")
  if io_utils.exists(config_path):
    with io_utils.open_file(config_path) as f:
      config_gin = f.read()
  eval_metrics: dict[str, float] = {}
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  if step is not None and io_utils.exists(metrics_path):
    with io_utils.open_file(metrics_path) as f:
      for line in f:
        event = json.loads(line) if line.strip() else {}
        if event.get("kind") == "eval" and event.get("step") == step:
          eval_metrics = {k: float(v) for k, v in event.items() if k not in ("kind", "step")}
  return CheckpointRecord(step_dir, step, config_gin, eval_metrics)


def render(record: CheckpointRecord, config: DualEncoderConfig, *, export_format: str,
           max_seq_lengths: dict[str, int], usage: str) -> str:
  """README.md text of an export.

  Args:
    record: the checkpoint's step, config and metrics.
    config: the exported model's architecture.
    export_format: "sentence_transformers", "saved_model" or "t5x".
    max_seq_lengths: {"queries": Lq, "passages": Lp} token lengths (EOS included) the export cuts
      texts to.
    usage: a Markdown section showing how to load and call the export.
  """
  enc = config.encoder
  tags = ("---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\ntags:\n"
          "- sentence-transformers\n- feature-extraction\n- samtone_jax\n---\n\n"
          if export_format == "sentence_transformers" else "")
  lines = [
      f"{tags}# samtone_jax dual encoder ({config.tower_sharing.upper()})",
      "",
      f"Exported by `python -m samtone_jax.export` (format `{export_format}`) from "
      f"`{record.step_dir}`" + (f", training step {record.step}." if record.step is not None
                                else "."),
      "",
      "## Architecture",
      "",
      f"- towers: `{config.tower_sharing}` (sde: one shared tower; ade*: a query and a document "
      "tower; see samtone_jax/models/dual_encoder.py)",
      f"- T5 encoder: d_model={enc.d_model}, d_kv={enc.d_kv}, d_ff={enc.d_ff}, "
      f"num_layers={enc.num_layers}, num_heads={enc.num_heads}, "
      f"feed_forward_proj={enc.feed_forward_proj}, vocab_size={enc.vocab_size}",
      f"- pooling: {config.pooling}; projection: Dense {enc.d_model} -> "
      f"{config.projection_dim} without bias; L2-normalised: {config.normalize}",
      # A t5x checkpoint computes nothing itself: the t5x run's gin files set its dtype.
      *([f"- activations were {enc.dtype} in samtone_jax; the export computes in float32, so its "
         "embeddings differ from the training-time ones by that rounding"]
        if enc.dtype != "float32" and export_format != "t5x" else []),
      *([f"- texts are cut to {max_seq_lengths['queries']} tokens (queries) and "
         f"{max_seq_lengths['passages']} tokens (documents), EOS included, as in training"]
        if export_format != "t5x" else []),
      "",
      usage.strip(),
      "",
      "## Evaluation of this checkpoint",
      "",
  ]
  if record.eval_metrics:
    lines += ["| metric | value |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.4f} |" for name, value in sorted(record.eval_metrics.items())]
  else:
    lines.append("The run recorded no evaluation at this step (metrics.jsonl).")
  lines += ["", "## Training configuration (config.gin)", ""]
  if record.config_gin is not None:
    lines += ["```gin", record.config_gin.rstrip(), "```"]
  else:
    lines.append("The run directory has no config.gin.")
  return "\n".join(lines) + "\n"
