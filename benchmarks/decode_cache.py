"""Greedy decoding with the key/value cache vs without: seconds per batch, in the same run.

  JAX_PLATFORMS=cpu python benchmarks/decode_cache.py [--size tiny] [--batch 32]
      [--input_length 64] [--max_length 64] [--repeats 5]

Cached: `decoding.greedy_decode`, which runs the decoder one position per step with each layer's
keys and values cached (O(max_length) decoder positions per sequence). Uncached: the greedy loop
`decoding.greedy_decode` ran before the cache (kept below as the peer): every step re-runs the
decoder over the whole [b, max_length] buffer of the tokens chosen so far and reads the logits at
the current position (O(max_length^2) decoder positions; the vocabulary head at one position
only). Both jitted once, same random `gin/models/{size}.gin` T5 1.1 weights (untied head) and
inputs (up to 25% trailing padding). EOS is disabled (eos_id -1) so that both run all max_length
steps; the script checks that both choose the same tokens. After one warm-up (compile) call each
they alternate for `--repeats` rounds; reported: median seconds per batch and uncached / cached.
"""

import argparse
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samtone_jax.models import decoding
from samtone_jax.models import encoder_decoder as ed
from samtone_jax.models.config import EncoderDecoderConfig
from gradient_cache import alternate  # pylint: disable=g-import-not-at-top,g-bad-import-order
from train_step import model_config_of  # pylint: disable=g-import-not-at-top,g-bad-import-order


@functools.partial(jax.jit, static_argnames=("config", "max_length", "eos_id"))
def uncached_greedy_decode(config: EncoderDecoderConfig, params, encoder_input_tokens: jax.Array,
                           max_length: int, eos_id: int = ed.EOS_ID):
  """The peer: greedy decoding without a cache (the decoder over the full prefix every step).

  Returns (tokens int32 [b, max_length], 0 after EOS; scores float32 [b]) as `greedy_decode`.
  """
  model = ed.EncoderDecoder(config)
  encoded = model.apply({"params": params}, encoder_input_tokens,
                        method=ed.EncoderDecoder.encode)
  batch = encoder_input_tokens.shape[0]

  def not_finished(state):
    position, _, done, _ = state
    return (position < max_length) & ~jnp.all(done)

  def step(state):
    position, outputs, done, scores = state
    logits = model.apply({"params": params}, encoded, encoder_input_tokens,
                         ed.shift_right(outputs), logits_position=position,
                         method=ed.EncoderDecoder.decode)
    log_probs = jax.nn.log_softmax(logits[:, 0], axis=-1)
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    token_log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    token = jnp.where(done, 0, token)
    scores = scores + jnp.where(done, 0.0, token_log_prob)
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, token, position, axis=1)
    return position + 1, outputs, done | (token == eos_id), scores

  state = (jnp.int32(0), jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.float32))
  _, outputs, _, scores = jax.lax.while_loop(not_finished, step, state)
  return outputs, scores


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--max_length", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  config = EncoderDecoderConfig(t5=model_config_of(args.size).encoder)
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, config.t5.vocab_size, (args.batch, args.input_length))
  for row, length in enumerate(rng.integers(args.input_length * 3 // 4, args.input_length + 1,
                                            args.batch)):
    inputs[row, length:] = 0
  inputs = jnp.asarray(inputs, jnp.int32)
  params = jax.jit(lambda key: nn.meta.unbox(ed.EncoderDecoder(config).init(
      key, inputs[:1], jnp.zeros((1, 1), jnp.int32))["params"]))(jax.random.PRNGKey(0))
  outputs = {}

  def runner(name, fn):
    def run():
      outputs[name] = jax.block_until_ready(fn(config, params, inputs, args.max_length,
                                               eos_id=-1))
    return run

  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {args.size} "
        f"encoder-decoder, batch {args.batch}, input length {args.input_length}, max_length "
        f"{args.max_length}, median of {args.repeats} alternating calls\n")
  seconds = alternate({"cached": runner("cached", decoding.greedy_decode),
                       "uncached": runner("uncached", uncached_greedy_decode)}, args.repeats)
  np.testing.assert_array_equal(np.asarray(outputs["cached"][0]),
                                np.asarray(outputs["uncached"][0]))
  print("| greedy decode | s/batch | sequences/s |")
  print("| --- | --- | --- |")
  for name, s in seconds.items():
    print(f"| {name} | {s:.3f} | {args.batch / s:.1f} |")
  print(f"\nsame tokens: yes; uncached / cached seconds: "
        f"{seconds['uncached'] / seconds['cached']:.2f}")


if __name__ == "__main__":
  main()
