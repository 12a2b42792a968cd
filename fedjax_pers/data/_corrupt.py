"""Populations changed for a study: label noise, a server hold-out set, held-out clients."""

from __future__ import annotations

import numpy as np

from fedjax_pers.core._data import FederatedData


def choose_clients(num_clients: int, fraction: float, seed: int = 0) -> np.ndarray:
  """A seeded `[num_clients]` bool mask with ⌊fraction · num_clients + 1/2⌋ True entries.

  Raises `ValueError` when a fraction > 0 would choose no client at all.
  """
  if not 0 <= fraction <= 1:
    raise ValueError(f"fraction must be in [0, 1]; got {fraction!r}.")
  count = int(np.floor(fraction * num_clients + 0.5))
  if fraction > 0 and count == 0:
    raise ValueError(f"fraction={fraction!r} of {num_clients} clients chooses no client; "
                     f"use at least {0.5 / num_clients:.3g} (half a client rounds up).")
  chosen = np.random.default_rng(seed).permutation(num_clients)[:count]
  mask = np.zeros(num_clients, bool)
  mask[chosen] = True
  return mask


def derangement(rng: np.random.Generator, n: int) -> np.ndarray:
  """A uniformly drawn permutation of `range(n)` with no fixed point (n ≥ 2)."""
  while True:
    p = rng.permutation(n)
    if not np.any(p == np.arange(n)):
      return p


def shuffle_labels(data: FederatedData, clients: np.ndarray, seed: int = 0) -> FederatedData:
  """Relabels each chosen client's data by its own random shuffle of the classes.

  Client c's labels become `π_c(y)`, with π_c a random permutation of the
  classes without fixed points: every label is wrong, consistently within the
  client (an annotator who swapped the class names). Shuffling the labels
  among a client's own examples instead would barely change clients that hold
  one or two classes, as most do in non-IID data.

  Args:
    data: The population (at least two classes).
    clients: `[num_clients]` bool mask of the clients to corrupt.
    seed: Seed of the permutations.

  Returns:
    A new `FederatedData` (the other clients unchanged).
  """
  clients = np.asarray(clients)
  if clients.shape != (data.num_clients,) or clients.dtype != bool:
    raise ValueError(f"clients must be a bool mask of shape ({data.num_clients},); got "
                     f"{clients.dtype} {clients.shape}.")
  if data.num_classes < 2:
    raise ValueError(f"shuffle_labels needs at least 2 classes; got {data.num_classes}.")
  rng = np.random.default_rng(seed)
  xs, ys = zip(*(data.client(c) for c in range(data.num_clients)))
  ys = [derangement(rng, data.num_classes)[y] if bad else y for y, bad in zip(ys, clients)]
  return _rebuild(data, list(xs), ys)


def _rebuild(like: FederatedData, xs, ys) -> FederatedData:
  """`FederatedData` of new client arrays in `like`'s layout: feature dtype and example cap."""
  out = FederatedData.from_clients(xs, ys, num_classes=like.num_classes, dtype=like.x.dtype)
  return out if like.cap is None else out.with_cap(like.cap)


def holdout(data: FederatedData, num_examples: int, seed: int = 0
            ) -> tuple[FederatedData, np.ndarray, np.ndarray]:
  """Moves `num_examples` examples, drawn uniformly from the pooled data, to a server set.

  Used for the small proxy set a server-side method (FedLAW) trains on; the
  examples are removed from `data`, so an evaluation on the rest never sees them.

  Returns:
    `(rest, x, y)`; every client keeps at least one example.
  """
  total = int(np.sum(data.num_examples))
  if not (isinstance(num_examples, int) and 0 < num_examples < total - data.num_clients):
    raise ValueError(
        f"num_examples must be an int in (0, {total - data.num_clients}) (each client keeps"
        f" one example); got {num_examples!r}.")
  rng = np.random.default_rng(seed)
  clients = [data.client(c) for c in range(data.num_clients)]
  owner = np.concatenate([np.full(len(y), c) for c, (_, y) in enumerate(clients)])
  first = np.concatenate([[True] + [False] * (len(y) - 1) for _, y in clients])
  pick = rng.choice(np.flatnonzero(~first), num_examples, replace=False)
  take = np.zeros(total, bool)
  take[pick] = True
  x_all = np.concatenate([x for x, _ in clients])
  y_all = np.concatenate([y for _, y in clients])
  keep = [~take[owner == c] for c in range(data.num_clients)]
  rest = _rebuild(data, [x[k] for (x, _), k in zip(clients, keep)],
                  [y[k] for (_, y), k in zip(clients, keep)])
  return rest, x_all[take], y_all[take]


def subset_clients(data: FederatedData, ids) -> FederatedData:
  """The clients `ids` of `data` (in that order) as their own `FederatedData`, padded to
  their own largest client, in `data`'s layout (feature dtype, example cap)."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or not len(ids) or ids.min() < 0 or ids.max() >= data.num_clients:
    raise ValueError(f"ids must be a non-empty 1-D array of client ids in [0, "
                     f"{data.num_clients}); got {ids.tolist()!r}.")
  pairs = [data.client(int(c)) for c in ids]
  return _rebuild(data, [x for x, _ in pairs], [y for _, y in pairs])


def holdout_clients(train: FederatedData, test: FederatedData, fraction: float,
                    seed: int = 0) -> tuple[FederatedData, FederatedData, FederatedData,
                                            FederatedData, np.ndarray]:
  """Keeps a seeded fraction of the clients out of training entirely (the participation
  gap of Yuan et al., "What Do We Mean by Generalization in Federated Learning?", ICLR
  2022): they are evaluated as clients the federation never saw.

  Args:
    train, test: Every client's train and test splits (the same clients).
    fraction: Share of the clients held out, in (0, 1): `choose_clients(N, fraction,
      seed)`; at least one client must stay in training.
    seed: Seed of the choice.

  Returns:
    `(train, test, unseen_train, unseen_test, unseen)`: the training clients' splits
    (in their original order), the held-out clients' splits, and the `[N]` bool mask of
    the held-out clients.
  """
  if train.num_clients != test.num_clients:
    raise ValueError(f"train and test must hold the same clients; got {train.num_clients} "
                     f"and {test.num_clients}.")
  if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
    raise ValueError(f"holdout fraction must be in (0, 1); got {fraction!r}.")
  unseen = choose_clients(train.num_clients, float(fraction), seed)
  if unseen.all():
    raise ValueError(f"holdout fraction={fraction!r} of {train.num_clients} clients holds "
                     "out every client; at least one must train.")
  seen_ids, unseen_ids = np.flatnonzero(~unseen), np.flatnonzero(unseen)
  return (subset_clients(train, seen_ids), subset_clients(test, seen_ids),
          subset_clients(train, unseen_ids), subset_clients(test, unseen_ids), unseen)
