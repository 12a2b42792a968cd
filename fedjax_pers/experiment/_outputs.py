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


def write_text(path: str, text: str) -> None:
  """Replaces `path` by `text` atomically: a reader (another process of the run) sees
  the old file or the new one, never a truncated one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj: Any, indent: int = 2) -> None:
  write_text(path, json.dumps(obj, indent=indent))


def figure(nrows: int = 1, ncols: int = 1, **kwargs):
  """`(fig, axes)` of a figure drawn off-screen with no pyplot: the caller's backend (a
  notebook's inline plots) is left alone, and nothing needs closing."""
  from matplotlib.figure import Figure

  fig = Figure(**kwargs)
  return fig, fig.subplots(nrows, ncols)


class RunFiles:
  """One run's growing files in `workdir`: `metrics.jsonl` (its evaluations),
  `round_weights.jsonl` (its rounds) and TensorBoard events. A sweep has one per
  variant. On a resume from round `done`, rows after it are dropped.

  `primary=False` (processes other than 0 of a distributed run) keeps the rows in
  memory and writes nothing.
  """

  def __init__(self, workdir: str, *, primary: bool, tensorboard: bool, done: int):
    from fedjax_pers.experiment._tensorboard import Board

    os.makedirs(workdir, exist_ok=True)
    self.workdir, self.primary = workdir, primary
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.weights_path = os.path.join(workdir, "round_weights.jsonl")
    self.records, self.weight_rows = ([r for r in read_jsonl(path) if r["round"] <= done]
                                      for path in (self.metrics_path, self.weights_path))
    self.board = Board(workdir, primary and tensorboard)
    if primary:   # atomically: the other processes may be reading it
      for path, rows in ((self.metrics_path, self.records),
                         (self.weights_path, self.weight_rows)):
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

  def evaluation(self, record: dict[str, Any]) -> None:
    self.records.append(record)
    if self.primary:
      append_jsonl(self.metrics_path, record)
    self.board.evaluation(record)

  def round(self, row: dict[str, Any]) -> None:
    self.weight_rows.append(row)
    if self.primary:
      append_jsonl(self.weights_path, row)
    self.board.round(row["round"], row["weights"])

  def close(self) -> None:
    self.board.close()


def plot_curves(records: list[dict[str, Any]], path: str, title: str = "",
                gains=None) -> None:
  """Test accuracy and train/test loss against round, as a PNG.

  With personalized evaluations in `records`, the accuracy panel also shows the
  personalized accuracy, and `gains` (per-client accuracy gain of the
  personalized model) adds a histogram panel.
  """
  rounds = [r["round"] for r in records]
  panels = 3 if gains is not None else 2
  fig, axes = figure(1, panels, figsize=(5 * panels, 4))
  ax1, ax2 = axes[0], axes[1]
  ax1.plot(rounds, [r["test_accuracy"] for r in records], label="test (global model)")
  if records and "personalized_test_accuracy" in records[0]:
    ax1.plot(rounds, [r["personalized_test_accuracy"] for r in records],
             label="test (personalized)")
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
  if gains is not None:
    axes[2].hist(gains, bins=20, color="tab:green", alpha=0.8)
    axes[2].axvline(0.0, color="black", linewidth=1)
    axes[2].set_xlabel("personalized − global accuracy (final, per client)")
    axes[2].set_ylabel("clients")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def weight_matrix(rows: list[dict[str, Any]], num_clients: int, key: str = "weights"):
  """`[rounds, num_clients]` weights (or another per-client field, `key`) from
  `round_weights.jsonl` rows (NaN: not sampled)."""
  import numpy as np

  w = np.full((len(rows), num_clients), np.nan)
  for t, r in enumerate(rows):
    w[t, r["clients"]] = r[key]
  return w


def plot_mixture(rows: list[dict[str, Any]], path: str) -> None:
  """The automated weighting's learned mixture π and temperatures τ against round."""
  rows = [r for r in rows if "mixture" in r]
  rounds = [r["round"] for r in rows]
  fig, (ax1, ax2) = figure(1, 2, figsize=(10, 4))
  for name in rows[0]["mixture"]:
    ax1.plot(rounds, [r["mixture"][name] for r in rows], label=name)
  ax1.set_xlabel("round")
  ax1.set_ylabel("mixture weight π")
  ax1.set_ylim(0, 1)
  ax1.legend()
  ax1.grid(alpha=0.3)
  for name in rows[0]["temperatures"]:
    ax2.plot(rounds, [r["temperatures"][name] for r in rows], label=name)
  ax2.set_xlabel("round")
  ax2.set_ylabel("temperature τ")
  ax2.set_yscale("log")
  ax2.legend()
  ax2.grid(alpha=0.3)
  fig.suptitle("automated weighting: the learned mixture of weighting families")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_clusters(rows: list[dict[str, Any]], num_clients: int, num_clusters: int,
                  path: str, title: str = "") -> None:
  """The cluster each sampled client chose, by client and round (blank: not sampled)."""
  import numpy as np

  c = weight_matrix(rows, num_clients, "clusters")
  import matplotlib

  fig, ax = figure(figsize=(min(4 + num_clients * 0.15, 16), 4.5))
  cmap = matplotlib.colormaps["tab10" if num_clusters <= 10 else "tab20"].resampled(num_clusters)
  im = ax.imshow(np.ma.masked_invalid(c.T), aspect="auto", interpolation="nearest", cmap=cmap,
                 vmin=-0.5, vmax=num_clusters - 0.5,
                 extent=(0.5, len(rows) + 0.5, num_clients - 0.5, -0.5))
  fig.colorbar(im, ax=ax, label="cluster", ticks=range(num_clusters))
  ax.set_xlabel("round")
  ax.set_ylabel("client")
  ax.set_title(title or "cluster chosen by each sampled client")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


MAX_PLOTTED_CLIENTS = 2000


def plot_weights(rows: list[dict[str, Any]], num_clients: int, path: str,
                 marked=None, title: str = "") -> None:
  """Heatmap of each client's aggregation weight by round (blank: not sampled).

  Over `MAX_PLOTTED_CLIENTS` clients, the rows are the clients ever sampled.

  `marked`: optional `[num_clients]` bool; those clients' columns are labelled
  in red (for instance the corrupted clients of a robustness study).
  """
  import numpy as np

  label = "client"
  if num_clients > MAX_PLOTTED_CLIENTS:   # a large population: the clients ever sampled
    seen = np.unique(np.concatenate([np.asarray(r["clients"]) for r in rows] or [[0]]))
    where = {int(c): i for i, c in enumerate(seen)}
    rows = [dict(r, clients=[where[int(c)] for c in r["clients"]]) for r in rows]
    marked = None if marked is None else np.asarray(marked)[seen]
    num_clients, label = len(seen), f"sampled clients ({len(seen)} of {num_clients}, by id)"
  w = weight_matrix(rows, num_clients)
  fig, ax = figure(figsize=(min(4 + num_clients * 0.15, 16), 4.5))
  im = ax.imshow(np.ma.masked_invalid(w.T), aspect="auto", interpolation="nearest",
                 cmap="viridis", extent=(0.5, len(rows) + 0.5, num_clients - 0.5, -0.5))
  fig.colorbar(im, ax=ax, label="weight")
  ax.set_xlabel("round")
  ax.set_ylabel(label)
  if marked is not None and np.any(marked):
    for c in np.flatnonzero(marked):
      ax.axhline(c, color="red", alpha=0.25, linewidth=3)
    ax.set_title((title + "  " if title else "") + "(red rows: corrupted clients)")
  elif title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def summary_table(summary: dict[str, Any]) -> str:
  """A short Markdown table of the headline numbers."""
  rows = [
      ("rounds", summary["rounds"]),
      ("final test accuracy (example-weighted)", f"{summary['final_test_accuracy']:.4f}"),
      ("mean client test accuracy", f"{summary['mean_client_test_accuracy']:.4f}"),
      ("worst-10% client test accuracy", f"{summary['worst10_client_test_accuracy']:.4f}"),
      ("variance of client test accuracy",
       f"{summary['variance_client_test_accuracy']:.5f}"),
      ("final test loss", f"{summary['final_test_loss']:.4f}"),
      ("best test accuracy over rounds", f"{summary['best_test_accuracy']:.4f}"),
      ("wall seconds", f"{summary['wall_seconds']:.1f}"),
      ("seconds per round (after compile)", f"{summary['seconds_per_round']:.4f}"),
  ]
  if "personalized_test_accuracy" in summary:
    rows += [
        ("personalized test accuracy",
         f"{summary['personalized_test_accuracy']:.4f}"),
        ("mean / worst-10% client personalized accuracy",
         f"{summary['mean_client_personalized_accuracy']:.4f} / "
         f"{summary['worst10_client_personalized_accuracy']:.4f}"),
        ("fraction of clients improved", f"{summary['fraction_clients_improved']:.3f}"),
    ]
  if "unseen_test_accuracy" in summary:
    n = len(summary["unseen_clients"])
    rows.append((f"unseen clients ({n}): test accuracy",
                 f"{summary['unseen_test_accuracy']:.4f}"))
    if "unseen_personalized_test_accuracy" in summary:
      rows += [
          ("unseen clients: personalized accuracy (worst 10%)",
           f"{summary['unseen_personalized_test_accuracy']:.4f} "
           f"({summary['unseen_worst10_client_personalized_accuracy']:.4f})"),
          ("unseen clients: fraction improved",
           f"{summary['unseen_fraction_clients_improved']:.3f}"),
      ]
  if "clean_client_test_accuracy" in summary:
    rows += [
        ("test accuracy on clean clients", f"{summary['clean_client_test_accuracy']:.4f}"),
        ("weight share of corrupted clients", f"{summary['corrupted_weight_share']:.4f}"),
        ("data share of corrupted clients", f"{summary['corrupted_data_share']:.4f}"),
    ]
  width = max(len(k) for k, _ in rows)
  lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
  lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
  return "\n".join(lines)
