"""Encoder-decoder train step: examples/s of ours vs PyTorch `T5ForConditionalGeneration`.

  JAX_PLATFORMS=cpu python benchmarks/encoder_decoder_step.py [--size tiny] [--batch 64]
      [--lengths 64,16] [--repeats 7]

Same shape on both sides: the `gin/models/{size}.gin` T5Config as an `EncoderDecoderConfig`
(untied head, T5 1.1), dropout 0.1, the same random token ids (inputs with 25% trailing padding,
targets with EOS and padding), AdamW (lr 1e-4, weight decay 0.01), one optimizer step per call.
Ours is `EncoderDecoderModel.loss_and_metrics` (token cross-entropy over real target tokens, no
z-loss, as HF's loss) under `jax.value_and_grad` and optax, jitted once with the state donated, on
the one real device; the trainer's `train_step.build` does not take the encoder-decoder yet, so
this is the step it will run minus the metric plumbing. Theirs is HF's forward with labels,
backward, `torch.optim.AdamW.step`, in float32 eager mode with torch's default threads. After a
warm-up step each, they alternate one step at a time for `--repeats` rounds; reported: the median
seconds per step, examples/s and ours / PyTorch.
"""

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from samtone_jax import losses
from samtone_jax.models import encoder_decoder as ed
from samtone_jax.models import seq2seq_model
from samtone_jax.models.config import EncoderDecoderConfig
from gradient_cache import alternate  # pylint: disable=g-import-not-at-top,g-bad-import-order
from train_step import model_config_of  # pylint: disable=g-import-not-at-top,g-bad-import-order

LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01


def make_batch(config: EncoderDecoderConfig, batch: int, input_length: int, target_length: int,
               seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  vocab = config.t5.vocab_size
  inputs = rng.integers(2, vocab, (batch, input_length)).astype(np.int32)
  targets = rng.integers(2, vocab, (batch, target_length)).astype(np.int32)
  input_lengths = rng.integers(input_length * 3 // 4, input_length + 1, batch)
  target_lengths = rng.integers(target_length // 2, target_length + 1, batch)
  for row in range(batch):
    inputs[row, input_lengths[row]:] = 0
    targets[row, target_lengths[row] - 1] = ed.EOS_ID
    targets[row, target_lengths[row]:] = 0
  return {seq2seq_model.ENCODER_INPUT_TOKENS: inputs,
          seq2seq_model.DECODER_TARGET_TOKENS: targets,
          seq2seq_model.DECODER_INPUT_TOKENS: np.asarray(ed.shift_right(targets))}


def jax_step(config: EncoderDecoderConfig, batch: dict[str, np.ndarray]):
  model = seq2seq_model.EncoderDecoderModel(config, losses.Seq2SeqLossConfig(
      loss_normalizing_factor="num_real_target_tokens", z_loss=0.0))
  params = jax.jit(lambda rng: nn.meta.unbox(model.init_variables(rng)["params"]))(
      jax.random.PRNGKey(0))
  tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  state = [(params, tx.init(params), jnp.zeros((), jnp.int32))]
  arrays = {k: jnp.asarray(v) for k, v in batch.items()}
  base_key = jax.random.PRNGKey(1)

  def update(state, batch):
    params, opt_state, step = state
    (loss, _), grads = jax.value_and_grad(model.loss_and_metrics, has_aux=True)(
        params, batch, jax.random.fold_in(base_key, step))
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, step + 1), loss

  update = jax.jit(update, donate_argnums=(0,))

  def step():
    state[0], loss = update(state[0], arrays)
    jax.block_until_ready(loss)

  return step


def torch_step(config: EncoderDecoderConfig, batch: dict[str, np.ndarray]):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  c = config.t5
  hf_config = transformers.T5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
      num_layers=c.num_layers, num_decoder_layers=config.decoder_layers, num_heads=c.num_heads,
      feed_forward_proj=c.feed_forward_proj, dropout_rate=c.dropout_rate,
      relative_attention_num_buckets=c.relative_attention_num_buckets,
      relative_attention_max_distance=c.relative_attention_max_distance,
      tie_word_embeddings=config.tie_word_embeddings)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(hf_config).train()
  if not config.tie_word_embeddings:  # A separate head, as ours (transformers 5 shares it).
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  inputs = torch.from_numpy(batch[seq2seq_model.ENCODER_INPUT_TOKENS].astype(np.int64))
  targets = batch[seq2seq_model.DECODER_TARGET_TOKENS].astype(np.int64)
  labels = torch.from_numpy(np.where(targets == 0, -100, targets))
  decoder_inputs = torch.from_numpy(batch[seq2seq_model.DECODER_INPUT_TOKENS].astype(np.int64))
  mask = (inputs != 0).long()

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=inputs, attention_mask=mask, decoder_input_ids=decoder_inputs,
                 labels=labels).loss
    loss.backward()
    optimizer.step()

  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lengths", default="64,16", help="input,target token lengths")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  input_length, target_length = (int(x) for x in args.lengths.split(","))
  config = EncoderDecoderConfig(t5=model_config_of(args.size).encoder)
  batch = make_batch(config, args.batch, input_length, target_length)
  import torch  # pylint: disable=g-import-not-at-top
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}; {args.size} encoder-decoder, batch {args.batch}, lengths "
        f"{input_length}/{target_length}, median of {args.repeats} alternating steps\n")
  seconds = alternate({"ours": jax_step(config, batch), "pytorch": torch_step(config, batch)},
                      args.repeats)
  print("| step | s/step | examples/s |")
  print("| --- | --- | --- |")
  for name, s in seconds.items():
    print(f"| {name} | {s:.3f} | {args.batch / s:.1f} |")
  print(f"\nours / pytorch examples/s: {seconds['pytorch'] / seconds['ours']:.2f}")


if __name__ == "__main__":
  main()
