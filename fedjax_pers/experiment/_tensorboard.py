"""TensorBoard event files of a run, written without TensorFlow (tensorboardX):
`tensorboard --logdir=WORKDIR` shows them."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np


class Board:
  """Scalars at each evaluation, the aggregation weights' histogram at each round.

  Writes to `workdir/tensorboard` when `enabled` (process 0 of a run only); a
  disabled board does nothing.
  """

  def __init__(self, workdir: str, enabled: bool):
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter

      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def evaluation(self, record: dict[str, Any]) -> None:
    """Every finite number of a `metrics.jsonl` record, under its own key, at its round."""
    if self._writer is None:
      return
    step = int(record["round"])
    for key, value in record.items():
      if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool) \
          and math.isfinite(value):
        self._writer.add_scalar(key, value, step)

  def round(self, step: int, weights) -> None:
    """The round's aggregation weights (the clients that took part) as a histogram."""
    if self._writer is not None and len(weights):
      self._writer.add_histogram("aggregation_weights", np.asarray(weights, np.float64), step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
