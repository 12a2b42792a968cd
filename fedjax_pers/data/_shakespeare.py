"""Shakespeare by speaking role (as LEAF's Shakespeare task): next-character prediction.

Each role of a play text is a client; the examples of a role are windows of its
own lines: `seq_len` characters as input, the character that follows as target.
"""

from __future__ import annotations

import gzip
import os
import re

import numpy as np

from fedjax_pers.data._sink import federate

# The character vocabulary: id 0 is the newline, ids 1..95 are the printable ASCII
# characters ' ' (32) .. '~' (126) in code-point order, and id 96 (`OOV_ID`) stands
# for every other character. Tiny Shakespeare uses 65 of them and no OOV character.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
OOV_ID = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1

_IDS = np.full(128, OOV_ID, np.int32)   # ASCII code point -> id
for _i, _ch in enumerate(VOCAB):
  _IDS[ord(_ch)] = _i


def encode(text: str) -> np.ndarray:
  """Character ids of `text` under `VOCAB` (`[len(text)]` int32; OOV_ID for the rest)."""
  codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  out = np.full(len(codes), OOV_ID, np.int32)
  ascii_ = codes < 128
  out[ascii_] = _IDS[codes[ascii_]]
  return out


def decode(ids) -> str:
  """The text of character ids (OOV_ID as U+FFFD)."""
  return "".join(VOCAB[i] if 0 <= i < len(VOCAB) else "\ufffd" for i in np.asarray(ids))


def split_roles(text: str) -> tuple[list[str], list[str]]:
  """A play text cut into roles: `(speakers, texts)` in order of first appearance.

  The text is a sequence of speeches separated by blank lines, each starting with
  a line `SPEAKER:`. A role's text is its speeches joined by newlines; speeches
  with no lines after the speaker line are skipped, and so are blocks that do not
  start with a speaker line.
  """
  speeches: dict[str, list[str]] = {}
  text = text.replace("\r\n", "\n")   # Windows line ends
  for block in re.split(r"\n\s*\n", text):
    lines = block.strip("\n").split("\n")
    if len(lines) < 2 or not lines[0].endswith(":"):
      continue
    speeches.setdefault(lines[0][:-1].strip(), []).append("\n".join(lines[1:]))
  return list(speeches), ["\n".join(s) for s in speeches.values()]


def role_examples(ids: np.ndarray, *, seq_len: int, test_fraction: float, stride: int = 1
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Next-character examples of one role, split by time.

  With `L = len(ids)`, the targets are the positions `t = seq_len, ..., L - 1`
  (input `ids[t - seq_len : t]`, target `ids[t]`). The last
  `max(1, ceil(test_fraction · (L − seq_len)))` targets form the test split, the
  earlier ones the train split (so every train target precedes every test target,
  as LEAF splits a role's samples; test inputs may reach back into train text).
  Each split then keeps every `stride`-th target, starting with its first.

  Returns:
    `((x_train, y_train), (x_test, y_test))`, x `[n, seq_len]` int32, y `[n]` int32.
  """
  m = len(ids) - seq_len
  if m < 2:
    raise ValueError(f"a role needs at least seq_len + 2 = {seq_len + 2} characters; got "
                     f"{len(ids)}.")
  n_test = min(max(1, int(np.ceil(test_fraction * m))), m - 1)
  targets = np.arange(seq_len, len(ids))
  windows = np.lib.stride_tricks.sliding_window_view(ids, seq_len)
  out = []
  for t in (targets[: m - n_test:stride], targets[m - n_test::stride]):
    out.append((np.ascontiguousarray(windows[t - seq_len]), ids[t].astype(np.int32)))
  return out[0], out[1]


def shakespeare_from_text(text: str, *, min_chars: int = 1000, seq_len: int = 80,
                          test_fraction: float = 0.2, stride: int = 1,
                          max_clients: int | None = None, store: str | None = None,
                          source: dict | None = None):
  """Train and test `FederatedData` of next-character prediction, one client per role.

  See `shakespeare` for the arguments; `text` is the play text itself.

  Returns:
    `(train, test, speakers)`: x `[N, max_n, seq_len]` int32 character ids, y the
    next character's id, `num_classes = VOCAB_SIZE`; `speakers[c]` names client c.
  """
  if not (isinstance(seq_len, int) and seq_len >= 1):
    raise ValueError(f"seq_len must be an int >= 1; got {seq_len!r}.")
  if not (isinstance(min_chars, int) and min_chars >= seq_len + 2):
    raise ValueError(f"min_chars must be an int >= seq_len + 2 = {seq_len + 2}; got "
                     f"{min_chars!r}.")
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}.")
  if not (isinstance(stride, int) and stride >= 1):
    raise ValueError(f"stride must be an int >= 1; got {stride!r}.")
  if max_clients is not None and not (isinstance(max_clients, int) and max_clients >= 1):
    raise ValueError(f"max_clients must be None or an int >= 1; got {max_clients!r}.")
  speakers, texts = split_roles(text)
  keep = [i for i, t in enumerate(texts) if len(t) >= min_chars]
  if max_clients is not None:
    keep = keep[:max_clients]
  if not keep:
    raise ValueError(f"no role has min_chars={min_chars} characters or more (the longest "
                     f"has {max((len(t) for t in texts), default=0)}).")
  def clients():
    for i in keep:
      (xa, ya), (xb, yb) = role_examples(encode(texts[i]), seq_len=seq_len,
                                         test_fraction=test_fraction, stride=stride)
      yield xa, ya, xb, yb

  train, test = federate(clients(), num_classes=VOCAB_SIZE, dtype=np.int32, store=store,
                         source=source)
  return train, test, [speakers[i] for i in keep]


def read_text(path: str) -> str:
  """A text file (optionally `.gz`), as UTF-8."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Text file not found: {path!r}.")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return f.read()


def shakespeare(path: str, *, min_chars: int = 1000, seq_len: int = 80,
                test_fraction: float = 0.2, stride: int = 1, max_clients: int | None = None,
                store: str | None = None):
  """Shakespeare by speaking role, from a play text such as `tinyshakespeare.txt(.gz)`.

  Every role with at least `min_chars` characters is a client (in order of first
  appearance). Its speeches, joined by newlines, are encoded with `VOCAB` (a
  newline, the printable ASCII characters, and `OOV_ID` for anything else) and
  cut into examples by `role_examples`: `seq_len` characters in, the next
  character as target; the last `test_fraction` of the role's targets are its
  test split. `stride` keeps every stride-th example (memory: one example per
  position stores `seq_len` ids per character of text).

  Args:
    path: The text file (`.gz` is decompressed).
    min_chars: Smallest role kept (characters of its joined speeches).
    seq_len: Input length.
    test_fraction: Share of each role's examples (the latest) in its test split.
    stride: Keep every `stride`-th example of each split.
    max_clients: Keep only the first this many roles (None: all).
    store: None, or a directory to write the splits to as host stores, a chunk
      of roles at a time (`federate`).

  Returns:
    `(train, test)` `FederatedData` with int32 x `[N, max_n, seq_len]`
    (`HostStore`s with `store`).

  Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "play.txt")
    >>> _ = open(p, "w").write("A:\\nabcdef\\n\\nB:\\nxyz\\n\\nA:\\nghij\\n")
    >>> train, test = shakespeare(p, min_chars=6, seq_len=4, test_fraction=0.25)
    >>> decode(train.x[0, 0]), decode(train.y[0, :1]), train.num_clients
    ('abcd', 'e', 1)
  """
  train, test, _ = shakespeare_from_text(
      read_text(path), min_chars=min_chars, seq_len=seq_len, test_fraction=test_fraction,
      stride=stride, max_clients=max_clients, store=store,
      source=dict(loader="shakespeare", path=os.path.abspath(path), min_chars=min_chars,
                  seq_len=seq_len, test_fraction=test_fraction, stride=stride,
                  max_clients=max_clients))
  return train, test
