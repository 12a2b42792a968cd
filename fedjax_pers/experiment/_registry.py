"""Config names to data, models, optimizers and local work (configs stay at the edge).

`_algorithms.py` maps `config.algorithm` on top of these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from fedjax_pers import data, models
from fedjax_pers.core import FederatedData, LocalWork, Model
from fedjax_pers.experiment._weighting import proxy_examples


def _pick(table: Mapping[str, Any], name: str, what: str) -> Any:
  if name not in table:
    raise ValueError(f"Unknown {what} {name!r}; expected one of {sorted(table)}.")
  return table[name]


def _sgd(c):
  return optax.sgd(c.learning_rate, momentum=c.get("momentum") or None)


OPTIMIZERS: dict[str, Callable[[ml_collections.ConfigDict], optax.GradientTransformation]] = {
    "sgd": _sgd,
    "momentum": lambda c: optax.sgd(c.learning_rate, momentum=c.momentum),
    "adam": lambda c: optax.adam(c.learning_rate, b1=c.get("b1", 0.9), b2=c.get("b2", 0.99),
                                 eps=c.get("eps", 1e-3)),
    "yogi": lambda c: optax.yogi(c.learning_rate, b1=c.get("b1", 0.9), b2=c.get("b2", 0.99),
                                 eps=c.get("eps", 1e-3)),
    "adagrad": lambda c: optax.adagrad(c.learning_rate, eps=c.get("eps", 1e-3)),
}

def traced(value) -> bool:
  """Whether a config number is traced by a sweep (`sweep.grid`): its checks were
  made on every variant's own number before (`experiment/_sweep.py`)."""
  return isinstance(value, jax.core.Tracer)


def make_optimizer(c: ml_collections.ConfigDict, where: str) -> optax.GradientTransformation:
  """An optax optimizer from `c.optimizer`, `c.learning_rate` (and its options).

  Server defaults follow Reddi et al. (ICLR 2021): adaptive optimizers with
  β1 = 0.9, β2 = 0.99 and ε = 1e-3.
  """
  if not traced(c.learning_rate) and not c.learning_rate > 0:
    raise ValueError(f"{where}.learning_rate must be > 0; got {c.learning_rate!r}.")
  make = _pick(OPTIMIZERS, c.optimizer, f"{where}.optimizer")
  momentum = c.get("momentum") or 0.0
  if c.optimizer == "momentum" and not 0 < momentum < 1:
    raise ValueError(f"{where}.optimizer='momentum' needs {where}.momentum in (0, 1), e.g. "
                     f"0.9; got {momentum!r}.")
  if c.optimizer not in ("sgd", "momentum") and momentum:
    raise ValueError(f"{where}.momentum applies to sgd and momentum, not "
                     f"{where}.optimizer={c.optimizer!r} (whose β1 is 0.9); got {momentum!r}.")
  return make(c)


def _partition(c: ml_collections.ConfigDict, y: np.ndarray) -> list[np.ndarray]:
  return data.partition(
      y, c.num_clients, c.get("partition", "iid"), seed=c.seed,
      alpha=c.get("dirichlet_alpha", 0.5), shards_per_client=c.get("shards_per_client", 2),
      sigma=c.get("quantity_sigma", 1.0), min_size=c.get("min_client_examples", 10))


def make_data(c: ml_collections.ConfigDict) -> tuple[FederatedData, FederatedData]:
  """`(train, test)` from `config.data` (`name` and its options).

  `synthetic`: Synthetic(α, β). `clustered_synthetic`: `clusters` logistic
  generators, each client's labels from one of them. `mnist_idx`: MNIST IDX files in `data_dir`
  (`images`, `labels`). `tfds`: the prepared TFDS set `tfds_name` (`tfds_split`,
  `tfds_data_dir`; never downloaded). Both are partitioned over `num_clients`
  clients by `partition`: `iid`, `dirichlet` (`dirichlet_alpha`,
  `min_client_examples`), `shards` (`shards_per_client`) or `quantity_skew`
  (`quantity_sigma`, `min_client_examples`), each client split into train and
  test by `test_fraction`. `shakespeare`: the play text at `path`, one client per
  role with `min_chars`+ characters (`seq_len`, `stride`). (`example_cap` is
  applied by `prepare_data`.)

  With `data.store`, the loader writes the pair of host stores there instead,
  a chunk of clients at a time, and `(train, test)` are `HostStore`s.
  """
  store = c.get("store")
  if c.name == "synthetic":
    train, test = data.synthetic(
        c.alpha, c.beta, num_clients=c.num_clients, dim=c.dim, num_classes=c.num_classes,
        sample_scale=c.sample_scale, iid=c.iid, seed=c.seed, test_fraction=c.test_fraction,
        store=store)
  elif c.name == "clustered_synthetic":
    if store is not None:
      raise ValueError("data.name='clustered_synthetic' is built in memory; data.store is "
                       "not supported for it.")
    train, test, _ = data.clustered_synthetic(
        c.clusters, num_clients=c.num_clients, dim=c.dim, num_classes=c.num_classes,
        seed=c.seed, test_fraction=c.test_fraction)
  elif c.name == "mnist_idx":
    x, y = data.mnist_idx(c.data_dir, c.images, c.labels)
    train, test = data.split_clients(x, y, _partition(c, y), test_fraction=c.test_fraction,
                                     num_classes=10, seed=c.seed, store=store)
  elif c.name == "tfds":
    train, test = data.from_tfds(
        c.tfds_name, split=c.get("tfds_split", "train"), partition=c.get("partition", "iid"),
        num_clients=c.num_clients, data_dir=c.get("tfds_data_dir"), seed=c.seed,
        test_fraction=c.test_fraction, alpha=c.get("dirichlet_alpha", 0.5),
        shards_per_client=c.get("shards_per_client", 2), sigma=c.get("quantity_sigma", 1.0),
        min_client_examples=c.get("min_client_examples", 10),
        min_chars=c.get("min_chars", 1000), seq_len=c.get("seq_len", 80),
        stride=c.get("stride", 1), store=store)
  elif c.name == "shakespeare":
    train, test = data.shakespeare(
        c.path, min_chars=c.get("min_chars", 1000), seq_len=c.get("seq_len", 80),
        test_fraction=c.test_fraction, stride=c.get("stride", 1),
        max_clients=c.get("max_clients"), store=store)
  else:
    raise ValueError(f"Unknown data.name {c.name!r}; expected one of ['clustered_synthetic', "
                     "'mnist_idx', 'shakespeare', 'synthetic', 'tfds'].")
  return train, test


class ExperimentData(NamedTuple):
  """The data of a run after the server hold-out and the corruptions.

  Attributes:
    train: Training population (labels shuffled for `noisy` clients).
    test: Test splits (never corrupted; without the held-out proxy examples).
    proxy: `(x, y)` server proxy set, or None.
    noisy: `[N]` bool, clients whose training labels are shuffled.
    attackers: `[N]` bool, clients that send scaled updates.
    unseen: `(train, test)` of the clients held out of training
      (`data.holdout_clients`), or None.
    unseen_ids: The held-out clients' ids in the partition (`[0]` shape when none).
    groups: `clustered_synthetic`: the training clients' true groups, else None.
  """

  train: FederatedData
  test: FederatedData
  proxy: tuple[np.ndarray, np.ndarray] | None
  noisy: np.ndarray
  attackers: np.ndarray
  unseen: tuple[FederatedData, FederatedData] | None = None
  unseen_ids: np.ndarray = np.zeros(0, np.int64)
  groups: np.ndarray | None = None


def prepare_data(config: ml_collections.ConfigDict) -> ExperimentData:
  """`make_data`, then `data.proxy_examples` held out of the test splits for the server,
  and `config.corruption` applied (label shuffling, attackers; see `data.shuffle_labels`),
  then `data.holdout_clients` of the clients set aside, never to train (`unseen`; the
  rest keep their order and are the run's clients), then the corruption, and last
  `data.example_cap`: train clients larger than it train on a fresh random
  `example_cap` of their examples each round (see `FederatedData.with_cap`).

  The corrupted clients are drawn with `corruption.seed`; label-noise and attack
  clients come from the same seeded order, so the smaller set is inside the larger.
  """
  train, test = make_data(config.data)
  proxy = None
  m = proxy_examples(config)
  if m:
    test, px, py = data.holdout(test, m, seed=config.data.seed)
    proxy = (px, py)
  unseen, unseen_ids = None, np.zeros(0, np.int64)
  groups = None if config.data.name != "clustered_synthetic" else data.cluster_groups(
      train.num_clients, config.data.clusters, config.data.seed)
  f = config.data.get("holdout_clients") or 0.0
  if f:
    train, test, u_train, u_test, mask = data.holdout_clients(train, test, f,
                                                              seed=config.data.seed)
    unseen, unseen_ids = (u_train, u_test), np.flatnonzero(mask)
    groups = None if groups is None else groups[~mask]
  c = config.get("corruption") or ml_collections.ConfigDict(
      dict(label_shuffle_fraction=0.0, attack_fraction=0.0, seed=0))
  noisy = data.choose_clients(train.num_clients, c.label_shuffle_fraction, c.seed)
  attackers = data.choose_clients(train.num_clients, c.attack_fraction, c.seed)
  if noisy.any():
    train = data.shuffle_labels(train, noisy, seed=c.seed)
  cap = config.data.get("example_cap")
  if cap is not None:   # last: the corruptions above rebuild the clients' arrays
    train = train.with_cap(cap, seed=config.data.seed)
  return ExperimentData(train, test, proxy, noisy, attackers, unseen, unseen_ids, groups)


def make_model(c: ml_collections.ConfigDict, feature_shape, num_classes: int) -> Model:
  """A `Model` from `config.model` (`name` and its options)."""
  table = {
      "char_rnn": lambda: models.char_rnn(
          int(feature_shape[0]), num_classes, embed=c.get("embed", 8),
          hidden=c.get("rnn_hidden", 128), layers=c.get("rnn_layers", 1),
          cell=c.get("cell", "lstm")),
      "logistic_regression": lambda: models.logistic_regression(feature_shape, num_classes),
      "mlp": lambda: models.mlp(feature_shape, num_classes, hidden=tuple(c.hidden)),
      "cnn": lambda: models.cnn(feature_shape, num_classes),
      "cnn_bn": lambda: models.cnn_bn(feature_shape, num_classes),
  }
  return _pick(table, c.name, "model.name")()


def make_local_work(c: ml_collections.ConfigDict) -> LocalWork:
  """`LocalWork` from `config.client` (`batch_size`, `local_epochs` or `local_steps`)."""
  return LocalWork(batch_size=c.batch_size, epochs=c.get("local_epochs"),
                   steps=c.get("local_steps"))
