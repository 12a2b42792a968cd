"""Plain NumPy references the vectorised engine must match."""

import jax
import numpy as np

import fedjax_pers as fp


def softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def logreg_sgd(w, b, x, y, plan_idx, plan_mask, lr, mu=None, anchor=None, train_w=True,
               train_b=True):
  """SGD on multinomial logistic regression over a batch plan, in float64 loops.

  The proximal term (mu/2)||(w, b) − anchor||² is centred at `anchor` (default
  the starting point). `train_w` / `train_b` False freeze that part.
  """
  w0, b0 = (w.copy(), b.copy()) if anchor is None else anchor
  loss_sum, count, steps = 0.0, 0, 0
  for idx, mask in zip(plan_idx, plan_mask):
    sel = idx[mask]
    if len(sel) == 0:
      continue
    xb, yb = x[sel], y[sel]
    p = softmax(xb @ w + b)
    loss_sum += -np.log(p[np.arange(len(yb)), yb]).sum()
    count += len(sel)
    steps += 1
    p[np.arange(len(yb)), yb] -= 1.0
    gw = xb.T @ p / len(sel)
    gb = p.sum(0) / len(sel)
    if mu is not None:
      gw = gw + mu * (w - w0)
      gb = gb + mu * (b - b0)
    w = w - lr * gw if train_w else w
    b = b - lr * gb if train_b else b
  return w, b, loss_sum / max(count, 1), steps


def cross_entropy(z, y):
  """Per-example cross-entropy of integer labels `y` under logits `z[..., C]`, in float64."""
  z = np.asarray(z, np.float64)
  top = z.max(axis=-1, keepdims=True)
  lse = (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(z, np.asarray(y)[..., None], -1)[..., 0]


def logreg_grad(w, b, x, y):
  """Gradient of the mean cross-entropy of multinomial logistic regression."""
  p = softmax(x @ w + b)
  p[np.arange(len(y)), y] -= 1.0
  return x.T @ p / len(y), p.sum(0) / len(y)


def logreg_loss(w, b, x, y):
  """Mean cross-entropy of multinomial logistic regression."""
  p = softmax(x @ w + b)
  return float(-np.log(p[np.arange(len(y)), y]).mean())


def engine_plan(rng, data, work, c=0, *, split=True):
  """The batch plan the engine gives client `c` in the round whose state key is `rng`.

  The round key splits into (next, sample, clients); client c's key is
  fold_in(clients, c), split into (plan, train) by the FedAvg-family updates
  (`split=True`) or used whole for the plan (Per-FedAvg, `split=False`).
  """
  _, _, k_clients = jax.random.split(rng, 3)
  key = jax.random.fold_in(k_clients, int(c))
  if split:
    key, _ = jax.random.split(key)
  return fp.core.batch_plan(key, data.num_examples[c], work, max_examples=data.max_examples,
                            min_examples=data.min_examples, client_id=int(c))


def client_deltas(params, data, rng, work, lr, clients_per_round, mu=None, ids=None):
  """Each sampled client's local training, with the engine's batches.

  Uses the engine's documented randomness: the round key splits into
  (next, sample, clients); client i's key is fold_in(clients, i), split into
  (plan, train).

  `ids`: these clients instead of the uniform sampler's.

  Returns:
    `(w, b, clients)` with the global float64 params and, per sampled client,
    a dict of `id, n, dw, db, train_loss, loss_before, loss_after`.
  """
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(params["Dense_0"]["bias"], np.float64)
  _, k_sample, _ = jax.random.split(rng, 3)
  idx = (np.asarray(fp.core.sample_clients(k_sample, data.num_clients, clients_per_round))
         if ids is None else np.asarray(ids))
  clients = []
  for c in idx:
    n = int(data.num_examples[c])
    plan = engine_plan(rng, data, work, c)
    x = np.asarray(data.x[c], np.float64)
    y = np.asarray(data.y[c])
    wi, bi, loss, steps = logreg_sgd(w, b, x, y, np.asarray(plan.idx),
                                     np.asarray(plan.mask), lr, mu)
    clients.append(dict(id=int(c), n=n, dw=wi - w, db=bi - b, train_loss=loss, steps=steps,
                        loss_before=logreg_loss(w, b, x[:n], y[:n]),
                        loss_after=logreg_loss(wi, bi, x[:n], y[:n])))
  return w, b, clients


def fedavg_round(params, data, rng, work, lr, clients_per_round, mu=None,
                 weighting="num_examples"):
  """One FedAvg/FedProx round (server SGD(1.0)) with the engine's batches."""
  w, b, clients = client_deltas(params, data, rng, work, lr, clients_per_round, mu)
  weights = np.asarray([c["n"] if weighting == "num_examples" else 1.0 for c in clients],
                       np.float64)
  weights = weights / np.sum(weights)
  dw = sum(p * c["dw"] for p, c in zip(weights, clients))
  db = sum(p * c["db"] for p, c in zip(weights, clients))
  return w + dw, b + db, weights, np.asarray([c["train_loss"] for c in clients])


def lpt_makespan(counts, lanes):
  """Iterations of list scheduling, longest first, of jobs `counts` on `lanes` lanes."""
  loads = [0] * lanes
  for c in sorted((int(c) for c in counts if c > 0), reverse=True):
    loads[loads.index(min(loads))] += c
  return max(loads)


def deal_by_steps(counts, devices):
  """The engine's dealing of clients to devices: longest first to the least-loaded
  device that is not full (k / devices clients each). Returns each device's clients."""
  per = len(counts) // devices
  loads, groups = [0] * devices, [[] for _ in range(devices)]
  for c in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
    j = min((d for d in range(devices) if len(groups[d]) < per), key=lambda d: (loads[d], d))
    loads[j] += counts[c]
    groups[j].append(c)
  return groups


def dropout_logreg(dim=5, num_classes=3, rate=0.5, hidden=None):
  """Logistic regression (or with `hidden`, a one-hidden-layer ReLU MLP) with dropout on
  its inputs (`rate`; 0: the plain model, the same params): a local step that loses the
  dropout key either fails (flax has no rng) or, at rate 0, is not what the test expects."""
  import flax.linen as nn

  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dropout(rate, deterministic=not train)(x)
      if hidden is not None:
        x = nn.relu(nn.Dense(hidden)(x))
        self.sow("intermediates", fp.core.REPRESENTATION, x)   # for MOON
      return nn.Dense(num_classes)(x)

  return fp.core.from_flax(Drop(), jax.ShapeDtypeStruct((1, dim), np.float32))
