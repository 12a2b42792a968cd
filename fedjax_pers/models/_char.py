"""A character-level recurrent model for next-character prediction (LEAF's Shakespeare)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_pers.core._model import REPRESENTATION, Model, from_flax


class _CharRNN(nn.Module):
  vocab_size: int
  embed: int
  hidden: int
  layers: int
  cell: str

  @nn.compact
  def __call__(self, x):
    h = nn.Embed(self.vocab_size, self.embed)(x.astype(jnp.int32))
    cell = nn.OptimizedLSTMCell if self.cell == "lstm" else nn.GRUCell
    for _ in range(self.layers):
      h = nn.RNN(cell(self.hidden))(h)
    self.sow("intermediates", REPRESENTATION, h[:, -1])
    return nn.Dense(self.vocab_size)(h[:, -1])


def char_rnn(seq_len: int, vocab_size: int, *, embed: int = 8, hidden: int = 128,
             layers: int = 1, cell: str = "lstm") -> Model:
  """Embedding → `layers` × LSTM (or GRU) → dense logits over the vocabulary.

  The model reads `seq_len` character ids and predicts the next character from the
  last position's hidden state (LEAF's Shakespeare model is embed 8, two LSTM
  layers of 256; the default here is one layer of 128, cheaper on CPUs).

  Args:
    seq_len: Input length (ids of shape `[batch, seq_len]`, any integer or float dtype
      holding integers).
    vocab_size: Number of character ids (the classes).
    embed: Embedding width.
    hidden: Recurrent state width.
    layers: Stacked recurrent layers.
    cell: `lstm` or `gru`.

  Returns:
    The `Model` (logits `[batch, vocab_size]`).
  """
  if cell not in ("lstm", "gru"):
    raise ValueError(f"char_rnn: cell must be 'lstm' or 'gru'; got {cell!r}.")
  for name, v in (("seq_len", seq_len), ("vocab_size", vocab_size), ("embed", embed),
                  ("hidden", hidden), ("layers", layers)):
    if not (isinstance(v, int) and v >= 1):
      raise ValueError(f"char_rnn: {name} must be an int >= 1; got {v!r}.")
  if vocab_size < 2:
    raise ValueError(f"char_rnn: vocab_size must be >= 2; got {vocab_size}.")
  module = _CharRNN(vocab_size, embed, hidden, layers, cell)
  return from_flax(module, jax.ShapeDtypeStruct((1, seq_len), jnp.int32))
