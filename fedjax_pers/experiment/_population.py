"""Where a run's clients live, and how the run reads and evaluates them.

`device_population`: every client padded on the device(s), put there once; each
round reads the whole population and each evaluation covers every client.

`store_population` (`config.data.store`): the clients stay in a pair of host
stores (`PATH/train`, `PATH/test`, see `data.federate`), written from
`config.data` on the first run and checked against it on later ones. Each round
gets its cohort gathered on a host thread one round ahead (`data.CohortFeed`);
evaluations stream the stores in chunks, over every client or over a seeded
sample of `config.eval_clients`.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fedjax_pers import data, distributed
from fedjax_pers.core import ClientEval, FederatedData, evaluate
from fedjax_pers.data._store import OFFSETS, X, Y
from fedjax_pers.experiment import _outputs, _registry

RECORD = "data_config.json"   # the config.data a store directory was written from


class Population(NamedTuple):
  """What the run loop needs of its clients.

  Attributes:
    view: Builds and initialises the algorithm (sizes of every client; a store
      run's holds one cohort's rows).
    test: The on-device test splits (None for a store run).
    feed: `feed(alg, rng)` -> the data of each round from the state whose key
      is `rng`, in order.
    evaluate: `evaluate(params, split)` -> `ClientEval` of the global model on
      the `'test'` or `'train'` split of the evaluated clients.
    info: Summary fields (`num_clients`, padding, bytes, `evaluation`) and
      `line`, a one-line description.
    close: Stops the feed's thread.
  """

  view: FederatedData
  test: FederatedData | None
  feed: Callable[[Any, jax.Array], Iterator[FederatedData]]
  evaluate: Callable[[Any, str], ClientEval]
  info: dict[str, Any]
  close: Callable[[], None] = lambda: None


def device_population(train: FederatedData, test: FederatedData, model, mesh
                      ) -> Population:
  """The population on the device(s): put on every device of `mesh` once."""
  train, test = distributed.replicate((train, test), mesh)
  fn = jax.jit(lambda params, d: evaluate(model, params, d))
  parts = []
  for name, d in (("train", train), ("test", test)):
    n = int(np.sum(np.asarray(d.num_examples)))
    what = (f"capped store, {d.cap} per client per round" if d.cap is not None
            else f"{100 * d.padding_fraction:.1f}% padding")
    parts.append(f"{name} {d.num_clients} clients, {n} examples, {what}, "
                 f"{d.stored_bytes / 2**20:.1f} MiB")
  info = {"num_clients": train.num_clients,
          "train_padding_fraction": round(train.padding_fraction, 4),
          "test_padding_fraction": round(test.padding_fraction, 4),
          "train_stored_bytes": train.stored_bytes, "test_stored_bytes": test.stored_bytes,
          "train_example_cap": train.cap,
          "evaluation": {"clients": "all", "num_clients": test.num_clients,
                         "streamed": False},
          "line": "; ".join(parts)}
  return Population(view=train, test=test, feed=lambda alg, rng: itertools.repeat(train),
                    evaluate=lambda params, split: fn(params, test if split == "test"
                                                      else train),
                    info=info)


# What a store run does not do (yet), each with why: refused rather than ignored.
def _refuse(config: ml_collections.ConfigDict) -> None:
  c, what = config.data, []
  if c.get("example_cap") is not None:
    what.append(f"data.example_cap={c.example_cap!r} (a round gathers whole clients)")
  if c.get("proxy_examples", 0):
    what.append(f"data.proxy_examples={c.proxy_examples!r} (no server hold-out from a "
                "store)")
  k = config.corruption
  if k.label_shuffle_fraction or k.attack_fraction:
    what.append("corruption.* (the corruptions rewrite the population in memory)")
  if config.personalization.finetune_steps:
    what.append(f"personalization.finetune_steps={config.personalization.finetune_steps!r} "
                "(fine-tuning evaluation runs on an on-device population)")
  if config.algorithm == "pfedme":
    what.append("algorithm='pfedme' (it trains every client each round)")
  if config.aggregation.population == "data":
    what.append("aggregation.population='data' (label histograms of the whole population)")
  if what:
    raise ValueError(f"data.store={c.get('store')!r}: a run from a host store does not "
                     f"take {'; '.join(what)}.")


def open_stores(config: ml_collections.ConfigDict) -> tuple[data.HostStore, data.HostStore]:
  """The train and test stores of `config.data.store`, written first if absent.

  `data.name='store'` runs from the stores as they are (written by the API, say).
  Any other `data.name` writes them from `config.data` (the loader's `store=`
  path, a chunk of clients at a time; process 0 writes, the others wait) and
  records that `config.data` beside them; a later run must ask for the same data.
  """
  c = config.data
  path = c.get("store")
  if path is None:
    raise ValueError("data.name='store' runs from the host store at data.store; set "
                     "data.store=PATH (a directory holding train/ and test/).")
  _refuse(config)
  if c.name == "store":
    return data.open_split_store(path)
  asked = {k: v for k, v in c.to_dict().items() if k != "store"}
  record = os.path.join(path, RECORD)
  if not data.store_exists(path):
    if jax.process_index() == 0:
      _registry.make_data(c)
      _outputs.write_json(record, asked)
    distributed.barrier("store written")
  if not os.path.exists(record):
    raise ValueError(f"Store {path!r} was not written from a config (no {RECORD}); run "
                     "from it as it is with data.name='store'.")
  with open(record) as f:
    held = json.load(f)
  diff = sorted(k for k in set(held) | set(asked) if held.get(k) != asked.get(k))
  if diff:
    raise ValueError(
        f"Store {path!r} holds other data than config.data asks for: "
        + ", ".join(f"data.{k} is {asked.get(k)!r}, the store's {held.get(k)!r}"
                    for k in diff) + ". Use another data.store, or the same data.* keys.")
  return data.open_split_store(path)


def eval_clients(config: ml_collections.ConfigDict, num_clients: int) -> np.ndarray | None:
  """The clients every evaluation covers: a seeded sample of `config.eval_clients`
  (sorted; drawn once, from `config.seed`), or None for all of them."""
  k = config.get("eval_clients")
  if k is None:
    return None
  if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= num_clients):
    raise ValueError(f"config.eval_clients must be None (all) or an int in [1, "
                     f"num_clients] = [1, {num_clients}]; got {k!r}.")
  rng = np.random.default_rng([config.seed, 0xE7A1])
  return np.sort(rng.choice(num_clients, k, replace=False))


def store_population(config: ml_collections.ConfigDict, model, mesh,
                     stores: tuple[data.HostStore, data.HostStore]) -> Population:
  """The population of the stores `open_stores(config)` gave; see the module docstring."""
  train, test = stores
  if train.num_clients != test.num_clients:
    raise ValueError(f"Store {config.data.store!r}: train holds {train.num_clients} clients "
                     f"and test {test.num_clients}; client c must be the same in both.")
  params = jax.eval_shape(model.init, jax.random.key(0))
  data.check_model(train, model, params)
  ids = eval_clients(config, test.num_clients)
  sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  k = min(config.clients_per_round, train.num_clients)
  view = train.cohort_data(np.arange(k), put=lambda a: jax.device_put(a, sharding))
  feeds = []

  def feed(alg, rng):
    feeds.append(data.CohortFeed(alg, train, rng, sharding=sharding))
    return feeds[-1]

  def evaluate_split(params, split):
    local = jax.tree.map(lambda a: a.addressable_data(0), params)   # this process's copy
    return data.evaluate_store(model, local, test if split == "test" else train,
                               clients=ids)

  def close():
    for f in feeds:
      f.close()

  size = lambda s: sum(os.path.getsize(os.path.join(s.path, f)) for f in (X, Y, OFFSETS))
  line = "; ".join(
      f"{name} store {s.path}: {s.num_clients} clients, {int(s.offsets[-1])} examples, "
      f"ragged, {size(s) / 2**20:.1f} MiB on disk" for name, s in (("train", train),
                                                                   ("test", test)))
  info = {"num_clients": train.num_clients, "data_store": os.path.abspath(config.data.store),
          "train_padding_fraction": 0.0, "test_padding_fraction": 0.0,
          "train_stored_bytes": size(train), "test_stored_bytes": size(test),
          "train_example_cap": None,
          "evaluation": {"clients": "all" if ids is None else "sample",
                         "num_clients": test.num_clients if ids is None else int(ids.size),
                         "of": test.num_clients, "seed": config.seed, "streamed": True},
          "evaluated_client_ids": None if ids is None else ids.tolist(),
          "line": line}
  return Population(view=view, test=None, feed=feed, evaluate=evaluate_split, info=info,
                    close=close)
