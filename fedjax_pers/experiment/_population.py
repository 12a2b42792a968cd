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

import json
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fedjax_pers import data, distributed, personalization
from fedjax_pers.core import ClientEval, ClientWindow, FederatedData, ServerState, evaluate
from fedjax_pers.core._execution import host_put
from fedjax_pers.data._store import OFFSETS, X, Y
from fedjax_pers.experiment import _outputs, _registry

RECORD = "data_config.json"   # the config.data a store directory was written from


class DevicePopulation:
  """Every client padded on the device(s), put on every device of `mesh` once; each
  round reads the whole population and each evaluation covers every client.

  `StorePopulation` has the same methods; the run loop calls only those.
  """

  def __init__(self, train: FederatedData, test: FederatedData, model, mesh):
    self.view, self.test = distributed.replicate((train, test), mesh)
    self._eval = jax.jit(lambda params, d: evaluate(model, params, d))
    parts = []
    for name, d in (("train", self.view), ("test", self.test)):
      n = int(np.sum(np.asarray(d.num_examples)))
      what = (f"capped store, {d.cap} per client per round" if d.cap is not None
              else f"{100 * d.padding_fraction:.1f}% padding")
      parts.append(f"{name} {d.num_clients} clients, {n} examples, {what}, "
                   f"{d.stored_bytes / 2**20:.1f} MiB")
    train, test = self.view, self.test
    self.line = "; ".join(parts)
    self.info = {
        "num_clients": train.num_clients,
        "train_padding_fraction": round(train.padding_fraction, 4),
        "test_padding_fraction": round(test.padding_fraction, 4),
        "train_stored_bytes": train.stored_bytes, "test_stored_bytes": test.stored_bytes,
        "train_example_cap": train.cap,
        "evaluation": {"clients": "all", "num_clients": test.num_clients, "streamed": False}}

  def start(self, alg, state: ServerState, round_fn, workdir: str, step: int | None):
    """`(state, step_fn)`: `step_fn(state) -> (state, metrics)` runs the next round.
    (`step`: the checkpoint `state` was restored from, or None.)"""
    return state, lambda s: round_fn(s, self.view)

  def evaluate(self, params, split: str) -> ClientEval:
    """The global model on the `'test'` or `'train'` splits of every client."""
    return self._eval(params, self.test if split == "test" else self.view)

  host_state_bytes = None   # per-client state on the host (none: it is in the state)

  def checkpoint(self, step: int, keep) -> None:
    """Saves what the server state does not hold for round `step` (nothing here)."""

  def close(self) -> None:
    pass


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
  if config.algorithm == "fedbuff":
    what.append("algorithm='fedbuff' (who reports next depends on the server's simulated "
                "clock: a feed cannot gather the cohort ahead)")
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


class StorePopulation:
  """The population of a pair of host stores (`open_stores`); see the module docstring.

  An algorithm with per-client state keeps it in `data.HostClientStates` (each
  round gets its cohort's in a `ClientWindow`), saved beside every checkpoint as
  `client_states/ROUND.npz` (the written clients' rows) and restored on resume.
  Personal models (`alg.personal`) are evaluated streamed, a chunk of clients at a
  time, on the same clients as the global model.
  """

  def __init__(self, config: ml_collections.ConfigDict, model, mesh,
               stores: tuple[data.HostStore, data.HostStore]):
    train, test = self.train, self.test_store = stores
    path = config.data.store
    if train.num_clients != test.num_clients:
      raise ValueError(f"Store {path!r}: train holds {train.num_clients} clients and test "
                       f"{test.num_clients}; client c must be the same in both.")
    data.check_model(train, model, jax.eval_shape(model.init, jax.random.key(0)))
    self.model, self.test = model, None
    self.ids = eval_clients(config, test.num_clients)
    self._mesh = mesh
    self._sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    self._put = host_put(self._sharding)
    k = min(config.clients_per_round, train.num_clients)
    self.view = train.cohort_data(np.arange(k), put=self._put)
    self._feed = self.states = self._dir = None
    size = lambda s: sum(os.path.getsize(os.path.join(s.path, f)) for f in (X, Y, OFFSETS))
    self.line = "; ".join(
        f"{name} store {s.path}: {s.num_clients} clients, {int(s.offsets[-1])} examples, "
        f"ragged, {size(s) / 2**20:.1f} MiB on disk" for name, s in (("train", train),
                                                                     ("test", test)))
    ids = self.ids
    self.info = {
        "num_clients": train.num_clients, "data_store": os.path.abspath(path),
        "train_padding_fraction": 0.0, "test_padding_fraction": 0.0,
        "train_stored_bytes": size(train), "test_stored_bytes": size(test),
        "train_example_cap": None,
        "evaluation": {"clients": "all" if ids is None else "sample",
                       "num_clients": test.num_clients if ids is None else int(ids.size),
                       "of": test.num_clients, "seed": config.seed, "streamed": True},
        "evaluated_client_ids": None if ids is None else ids.tolist()}

  def start(self, alg, state: ServerState, round_fn, workdir: str, step: int | None):
    """`(state, step_fn)` as `DevicePopulation.start`; restores the host states of
    checkpoint `step`."""
    self._alg = alg
    self._dir = os.path.join(workdir, "client_states")
    if isinstance(state.client_states, ClientWindow):
      self.states = data.HostClientStates(state.client_states, self.train.num_clients)
      if step is not None:
        file = os.path.join(self._dir, f"{step}.npz")
        if not os.path.exists(file):
          raise ValueError(f"Checkpoint of round {step} in {workdir!r} has no {file!r} (the "
                           "per-client states of a run from a host store).")
        with np.load(file) as snap:
          self.states.restore(dict(snap))
    self._feed = data.CohortFeed(alg, self.train, state.rng, mesh=self._mesh)

    def step_fn(s):
      d = next(self._feed)
      if self.states is None:
        return round_fn(s, d)
      s, m = round_fn(self.states.load(s, d, put=self._put), d)
      self.states.save(s, d)
      return s, m

    return state, step_fn

  def evaluate(self, params, split: str) -> ClientEval:
    """The global model on the evaluated clients' `'test'` or `'train'` split, streamed."""
    return data.evaluate_store(self.model, _local(params),
                               self.test_store if split == "test" else self.train,
                               clients=self.ids)

  def personalized(self, chunk: int = 256):
    """`fn(state) -> PersonalizedEval` of the clients' own models (`alg.personal`) and the
    global model on the evaluated clients' test splits, a chunk of clients at a time."""
    alg, test, model = self._alg, self.test_store, self.model
    ids = np.arange(test.num_clients) if self.ids is None else self.ids
    chunk = min(chunk, ids.size)

    @jax.jit
    def one(params, states, x, y, n):
      personal = alg.personal(ServerState(params, None, None, states, None, None))
      d = FederatedData(x=x, y=y, num_examples=n, num_classes=test.num_classes,
                        min_examples=test.min_examples)
      return personalization.evaluate_personal(model, personal, params, d)

    def fn(state):
      params, parts = _local(state.params), []
      for a in range(0, ids.size, chunk):
        part = ids[a:a + chunk]
        padded = np.concatenate([part, np.full(chunk - part.size, part[-1])])
        x, y = test.gather(padded)
        ev = one(params, self.states.gather(padded), x, y, test.sizes[padded].astype(np.int32))
        parts.append(jax.tree.map(lambda v, m=part.size: np.asarray(v)[:m], ev))
      return jax.tree.map(lambda *v: np.concatenate(v), *parts)

    return fn if self.states is not None and alg.personal is not None else None

  @property
  def host_state_bytes(self) -> int | None:
    """Bytes of the per-client states written to the host so far (None: no state)."""
    return None if self.states is None else self.states.nbytes

  def checkpoint(self, step: int, keep) -> None:
    """Saves the host states of round `step` (process 0); drops those of rounds no
    longer in `keep` (the checkpoint manager's rounds)."""
    if self.states is None or jax.process_index() != 0:
      return
    os.makedirs(self._dir, exist_ok=True)
    tmp = os.path.join(self._dir, f".{step}.npz")
    np.savez(tmp, **self.states.snapshot())
    os.replace(tmp, os.path.join(self._dir, f"{step}.npz"))
    for name in os.listdir(self._dir):
      if name.endswith(".npz") and not name.startswith(".") and int(name[:-4]) not in (
          *keep, step):
        os.remove(os.path.join(self._dir, name))

  def close(self) -> None:
    """Stops the feed; `info` gains the client rows this process gathered per cohort
    (over a mesh, its devices' share)."""
    if self._feed is not None:
      self._feed.close()
      f = self._feed
      self.info["rows_gathered_per_cohort"] = (
          f.rows_gathered / f.cohorts_gathered if f.cohorts_gathered else None)


def _local(tree):
  """This process's copy of a (replicated) pytree of arrays."""
  return jax.tree.map(lambda a: a.addressable_data(0), tree)
