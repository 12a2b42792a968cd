"""Shakespeare by speaking role: vocabulary, examples, time split, filter; the char model;
FedAvg lowers the test loss."""

import os

import jax
import numpy as np
import pytest

import fedjax_pers as fp
from fedjax_pers.data import OOV_ID, VOCAB, VOCAB_SIZE

SHARED_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                           "shakespeare", "tinyshakespeare.txt.gz")
needs_text = pytest.mark.skipif(not os.path.exists(SHARED_TEXT),
                                reason="../shared/data/shakespeare is absent")

PLAY = ("ANNA:\nabcdefghij\nklm\n\nBOB:\nshort\n\nANNA:\nnopq\n\n"
        "CARL:\n0123456789~\n\nEMPTY:\n\nBOB:\nxy\n")


def write(tmp_path, text):
  path = os.path.join(tmp_path, "play.txt")
  with open(path, "w") as f:
    f.write(text)
  return path


def test_vocabulary():
  assert VOCAB[0] == "\n" and VOCAB[1] == " " and VOCAB[-1] == "~" and len(VOCAB) == 96
  assert OOV_ID == 96 and VOCAB_SIZE == 97
  ids = fp.data._shakespeare.encode("a\n é~")
  np.testing.assert_array_equal(ids, [VOCAB.index("a"), 0, 1, OOV_ID, 95])
  assert fp.data._shakespeare.decode(ids) == "a\n \ufffd~"


def test_roles_examples_and_time_split(tmp_path):
  speakers, texts = fp.data._shakespeare.split_roles(PLAY)
  assert speakers == ["ANNA", "BOB", "CARL"]
  assert texts[0] == "abcdefghij\nklm\nnopq"         # speeches joined by newlines
  assert fp.data._shakespeare.split_roles(PLAY.replace("\n", "\r\n")) == (speakers, texts)
  train, test = fp.data.shakespeare(write(tmp_path, PLAY), min_chars=11, seq_len=3,
                                    test_fraction=0.25)
  assert train.num_clients == 2          # ANNA (19 chars) and CARL (11); BOB (8) filtered
  assert train.x.dtype == np.int32 and train.feature_shape == (3,)
  dec = fp.data._shakespeare.decode
  for c, text in enumerate([texts[0], texts[2]]):
    m = len(text) - 3                                 # targets at positions 3..L-1
    n_test = int(np.ceil(0.25 * m))
    xa, ya = train.client(c)
    xb, yb = test.client(c)
    assert len(ya) == m - n_test and len(yb) == n_test
    # Every example is a window and the character right after it.
    pairs = [(dec(x), dec([t])) for x, t in zip(np.concatenate([xa, xb]),
                                                 np.concatenate([ya, yb]))]
    assert pairs == [(text[t - 3:t], text[t]) for t in range(3, len(text))]
  # CARL's '~' is in the vocabulary; the test split is the end of the role's text.
  assert dec(test.client(1)[1]) == "9~"


def test_stride_and_errors(tmp_path):
  path = write(tmp_path, PLAY)
  full, _ = fp.data.shakespeare(path, min_chars=11, seq_len=3, test_fraction=0.25)
  strided, _ = fp.data.shakespeare(path, min_chars=11, seq_len=3, test_fraction=0.25,
                                   stride=2)
  np.testing.assert_array_equal(strided.client(0)[1], full.client(0)[1][::2])
  with pytest.raises(ValueError, match="min_chars"):
    fp.data.shakespeare(path, min_chars=3, seq_len=3)
  with pytest.raises(ValueError, match="no role"):
    fp.data.shakespeare(path, min_chars=100, seq_len=3)
  with pytest.raises(FileNotFoundError):
    fp.data.shakespeare(str(tmp_path / "missing.txt"))


@needs_text
def test_shared_text_has_100_plus_roles():
  train, test = fp.data.shakespeare(SHARED_TEXT, min_chars=1000, stride=50)
  assert train.num_clients == 141 >= 100
  assert train.num_classes == VOCAB_SIZE
  assert int(train.y.max()) < OOV_ID          # tiny Shakespeare has no OOV character


def test_char_rnn_shapes_and_checks():
  model = fp.models.char_rnn(12, VOCAB_SIZE, hidden=16)
  params = model.init(jax.random.key(0))
  x = np.zeros((3, 12), np.int32)
  assert model.apply(params, x).shape == (3, VOCAB_SIZE)
  assert fp.models.char_rnn(12, VOCAB_SIZE, hidden=8, cell="gru", layers=2).apply(
      fp.models.char_rnn(12, VOCAB_SIZE, hidden=8, cell="gru", layers=2).init(
          jax.random.key(1)), x).shape == (3, VOCAB_SIZE)
  with pytest.raises(ValueError, match="cell"):
    fp.models.char_rnn(12, VOCAB_SIZE, cell="rnn")


@needs_text
@pytest.mark.slow
def test_fedavg_lowers_shakespeare_test_loss():
  import optax
  train, test = fp.data.shakespeare(SHARED_TEXT, min_chars=1000, seq_len=40, stride=40,
                                    max_clients=20)
  model = fp.models.char_rnn(40, VOCAB_SIZE, hidden=32)
  alg = fp.algorithms.fedavg(model, optax.sgd(1.0), optax.sgd(1.0),
                             fp.core.LocalWork(batch_size=10, steps=10), clients_per_round=5)
  state = alg.init(jax.random.key(0), train)
  loss = lambda s: fp.core.summarize(fp.core.evaluate(model, s.params, test))["test_loss"]
  before = loss(state)
  step = jax.jit(alg.round)
  for _ in range(15):
    state, _ = step(state, train)
  after = loss(state)
  assert after < before - 0.5, (before, after)
