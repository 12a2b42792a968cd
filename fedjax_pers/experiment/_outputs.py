"""What a run writes: metrics as JSON lines, the summary, curves, a printed table."""

from __future__ import annotations

import json
import os
from typing import Any


def append_jsonl(path: str, record: dict[str, Any]) -> None:
  """Appends one JSON object as a line."""
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All objects of a JSON-lines file (empty if it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def plot_curves(records: list[dict[str, Any]], path: str, title: str = "") -> None:
  """Test accuracy and train/test loss against round, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rounds = [r["round"] for r in records]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ax1.plot(rounds, [r["test_accuracy"] for r in records], label="test (global model)")
  if records and "mean_client_test_accuracy" in records[0]:
    ax1.plot(rounds, [r["mean_client_test_accuracy"] for r in records], "--",
             label="mean over clients")
    ax1.plot(rounds, [r["worst10_client_test_accuracy"] for r in records], ":",
             label="worst 10% of clients")
  ax1.set_xlabel("round")
  ax1.set_ylabel("accuracy")
  ax1.legend()
  ax1.grid(alpha=0.3)
  ax2.plot(rounds, [r["test_loss"] for r in records], label="test loss")
  if records and "train_loss" in records[0]:
    ax2.plot(rounds, [r["train_loss"] for r in records], label="train loss (global model)")
  ax2.set_xlabel("round")
  ax2.set_ylabel("loss")
  ax2.set_yscale("log")
  ax2.legend()
  ax2.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary_table(summary: dict[str, Any]) -> str:
  """A short Markdown table of the headline numbers."""
  rows = [
      ("rounds", summary["rounds"]),
      ("final test accuracy (example-weighted)", f"{summary['final_test_accuracy']:.4f}"),
      ("mean client test accuracy", f"{summary['mean_client_test_accuracy']:.4f}"),
      ("worst-10% client test accuracy", f"{summary['worst10_client_test_accuracy']:.4f}"),
      ("final test loss", f"{summary['final_test_loss']:.4f}"),
      ("best test accuracy over rounds", f"{summary['best_test_accuracy']:.4f}"),
      ("wall seconds", f"{summary['wall_seconds']:.1f}"),
      ("seconds per round (after compile)", f"{summary['seconds_per_round']:.4f}"),
  ]
  width = max(len(k) for k, _ in rows)
  lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
  lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
  return "\n".join(lines)
