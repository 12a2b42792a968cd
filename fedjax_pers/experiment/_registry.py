"""The one table from config names to library objects (configs stay at the edge)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from fedjax_pers import algorithms, data, distributed, models, personalization
from fedjax_pers.core import FederatedAlgorithm, FederatedData, LocalWork, Model
from fedjax_pers.experiment._weighting import make_weighting


def _pick(table: Mapping[str, Any], name: str, what: str) -> Any:
  if name not in table:
    raise ValueError(f"Unknown {what} {name!r}; expected one of {sorted(table)}.")
  return table[name]


def _sgd(c):
  return optax.sgd(c.learning_rate, momentum=c.get("momentum") or None)


OPTIMIZERS: dict[str, Callable[[ml_collections.ConfigDict], optax.GradientTransformation]] = {
    "sgd": _sgd,
    "momentum": lambda c: optax.sgd(c.learning_rate, momentum=c.get("momentum", 0.9)),
    "adam": lambda c: optax.adam(c.learning_rate, b1=c.get("b1", 0.9), b2=c.get("b2", 0.99),
                                 eps=c.get("eps", 1e-3)),
    "yogi": lambda c: optax.yogi(c.learning_rate, b1=c.get("b1", 0.9), b2=c.get("b2", 0.99),
                                 eps=c.get("eps", 1e-3)),
    "adagrad": lambda c: optax.adagrad(c.learning_rate, eps=c.get("eps", 1e-3)),
}

def make_optimizer(c: ml_collections.ConfigDict, where: str) -> optax.GradientTransformation:
  """An optax optimizer from `c.optimizer`, `c.learning_rate` (and its options).

  Server defaults follow Reddi et al. (ICLR 2021): adaptive optimizers with
  β1 = 0.9, β2 = 0.99 and ε = 1e-3.
  """
  if not c.learning_rate > 0:
    raise ValueError(f"{where}.learning_rate must be > 0; got {c.learning_rate!r}.")
  return _pick(OPTIMIZERS, c.optimizer, f"{where}.optimizer")(c)


def make_data(c: ml_collections.ConfigDict) -> tuple[FederatedData, FederatedData]:
  """`(train, test)` from `config.data` (`name` and its options).

  `synthetic`: Synthetic(α, β). `mnist_idx`: MNIST IDX files in `data_dir`
  (`images`, `labels`), partitioned over `num_clients` clients by `partition`
  (`iid`, or `dirichlet` with `dirichlet_alpha` and `min_client_examples`),
  each client split into train and test by `test_fraction`.
  """
  if c.name == "synthetic":
    return data.synthetic(
        c.alpha, c.beta, num_clients=c.num_clients, dim=c.dim, num_classes=c.num_classes,
        sample_scale=c.sample_scale, iid=c.iid, seed=c.seed, test_fraction=c.test_fraction)
  if c.name == "mnist_idx":
    x, y = data.mnist_idx(c.data_dir, c.images, c.labels)
    partition = c.get("partition", "iid")
    if partition == "iid":
      parts = data.iid(len(y), c.num_clients, seed=c.seed)
    elif partition == "dirichlet":
      parts = data.dirichlet(y, c.num_clients, c.dirichlet_alpha,
                             min_size=c.get("min_client_examples", 10), seed=c.seed)
    else:
      raise ValueError(f"Unknown data.partition {partition!r}; expected 'iid' or 'dirichlet'.")
    return data.split_clients(x, y, parts, test_fraction=c.test_fraction, num_classes=10,
                              seed=c.seed)
  raise ValueError(f"Unknown data.name {c.name!r}; expected one of ['mnist_idx', 'synthetic'].")


class ExperimentData(NamedTuple):
  """The data of a run after the server hold-out and the corruptions.

  Attributes:
    train: Training population (labels shuffled for `noisy` clients).
    test: Test splits (never corrupted; without the held-out proxy examples).
    proxy: `(x, y)` server proxy set, or None.
    noisy: `[N]` bool, clients whose training labels are shuffled.
    attackers: `[N]` bool, clients that send scaled updates.
  """

  train: FederatedData
  test: FederatedData
  proxy: tuple[np.ndarray, np.ndarray] | None
  noisy: np.ndarray
  attackers: np.ndarray


def prepare_data(config: ml_collections.ConfigDict) -> ExperimentData:
  """`make_data`, then `data.proxy_examples` held out of the test splits for the server,
  and `config.corruption` applied (label shuffling, attackers; see `data.shuffle_labels`).

  The corrupted clients are drawn with `corruption.seed`; label-noise and attack
  clients come from the same seeded order, so the smaller set is inside the larger.
  """
  train, test = make_data(config.data)
  proxy = None
  m = config.data.get("proxy_examples", 0)
  if m:
    test, px, py = data.holdout(test, m, seed=config.data.seed)
    proxy = (px, py)
  c = config.get("corruption") or ml_collections.ConfigDict(
      dict(label_shuffle_fraction=0.0, attack_fraction=0.0, seed=0))
  noisy = data.choose_clients(train.num_clients, c.label_shuffle_fraction, c.seed)
  attackers = data.choose_clients(train.num_clients, c.attack_fraction, c.seed)
  if noisy.any():
    train = data.shuffle_labels(train, noisy, seed=c.seed)
  return ExperimentData(train, test, proxy, noisy, attackers)


def make_model(c: ml_collections.ConfigDict, feature_shape, num_classes: int) -> Model:
  """A `Model` from `config.model` (`name` and its options)."""
  table = {
      "logistic_regression": lambda: models.logistic_regression(feature_shape, num_classes),
      "mlp": lambda: models.mlp(feature_shape, num_classes, hidden=tuple(c.hidden)),
      "cnn": lambda: models.cnn(feature_shape, num_classes),
  }
  return _pick(table, c.name, "model.name")()


def make_local_work(c: ml_collections.ConfigDict) -> LocalWork:
  """`LocalWork` from `config.client` (`batch_size`, `local_epochs` or `local_steps`)."""
  return LocalWork(batch_size=c.batch_size, epochs=c.get("local_epochs"),
                   steps=c.get("local_steps"))


def make_algorithm(config: ml_collections.ConfigDict, model: Model, train: FederatedData,
                   *, proxy=None, attackers: np.ndarray | None = None) -> FederatedAlgorithm:
  """The `FederatedAlgorithm` named by `config.algorithm`.

  `config.sampling`: `uniform` cohorts, or `num_examples` (clients drawn with
  probability ∝ n_i without replacement, as FedProx's code samples).
  `config.aggregation.weighting`: see `make_weighting`.
  """
  sampling = config.get("sampling", "uniform")
  probs = _pick({"uniform": None, "num_examples": np.asarray(train.num_examples, np.float64)},
                sampling, "sampling")
  kwargs = dict(
      sampling_probs=probs,
      clients_per_round=config.clients_per_round,
      weighting=make_weighting(config, model, train, proxy, attackers),
      strategy=config.strategy, client_chunk=config.get("client_chunk"),
      mesh=distributed.client_mesh(config.num_devices) if config.get("num_devices", 1) > 1
      else None)
  client_tx = make_optimizer(config.client, "client")
  server_tx = make_optimizer(config.server, "server")
  work = make_local_work(config.client)
  if config.algorithm == "finetune" and not config.personalization.finetune_steps:
    raise ValueError("algorithm='finetune' needs personalization.finetune_steps > 0; got "
                     f"{config.personalization.finetune_steps!r}.")
  table = {
      "fedavg": lambda: algorithms.fedavg(model, client_tx, server_tx, work, **kwargs),
      # FedAvg's global model, fine-tuned by every client at each evaluation.
      "finetune": lambda: algorithms.fedavg(model, client_tx, server_tx, work, **kwargs),
      "fedprox": lambda: algorithms.fedprox(model, client_tx, server_tx, work,
                                            mu=config.fedprox.mu, **kwargs),
      "ditto": lambda: algorithms.ditto(model, client_tx, server_tx, work,
                                        lam=config.ditto.lam, **kwargs),
      # Personal layers: the model's last layer (its head) is personal / shared.
      "fedper": lambda: algorithms.fedper(model, client_tx, server_tx, work, **kwargs),
      "lg_fedavg": lambda: algorithms.lg_fedavg(model, client_tx, server_tx, work, **kwargs),
      "pfedme": lambda: algorithms.pfedme(
          model, work if config.pfedme.get("local_rounds") is None else LocalWork(
              batch_size=config.client.batch_size, steps=config.pfedme.local_rounds),
          learning_rate=config.client.learning_rate,
          personal_learning_rate=config.pfedme.personal_learning_rate, lam=config.pfedme.lam,
          inner_steps=config.pfedme.inner_steps, beta=config.pfedme.beta,
          clients_per_round=config.clients_per_round, strategy=config.strategy,
          client_chunk=config.get("client_chunk"), mesh=kwargs["mesh"]),
      "apfl": lambda: algorithms.apfl(model, client_tx, server_tx, work,
                                      alpha=config.apfl.alpha, **kwargs),
      "fedrep": lambda: algorithms.fedrep(
          model, client_tx, server_tx, work,
          head_work=LocalWork(batch_size=config.client.batch_size,
                              steps=config.fedrep.head_steps), **kwargs),
  }
  return _pick(table, config.algorithm, "algorithm")()


def make_personalized_eval(config: ml_collections.ConfigDict, model: Model,
                           alg: FederatedAlgorithm, train: FederatedData, test: FederatedData):
  """`fn(state) -> PersonalizedEval` (jitted), or None when nothing is personalized.

  An algorithm with personal models (`alg.personal`, e.g. Ditto) is evaluated
  with them. Otherwise, with `config.personalization.finetune_steps > 0`, every
  client fine-tunes the global model for that many steps of
  `personalization.optimizer` on its train split; the key depends on the seed
  and the round only. Either way each client is tested on its test split.
  """
  c = config.get("personalization")
  chunk = None if c is None else c.get("client_chunk")
  if alg.personal is not None:
    return jax.jit(lambda state: personalization.evaluate_personal(
        model, alg.personal(state), state.params, test, client_chunk=chunk))
  if c is None or not c.finetune_steps:
    return None
  if not (isinstance(c.finetune_steps, int) and c.finetune_steps > 0):
    raise ValueError(
        f"personalization.finetune_steps must be an int >= 0; got {c.finetune_steps!r}.")
  tx = make_optimizer(c, "personalization")
  work = LocalWork(batch_size=c.batch_size, steps=c.finetune_steps)
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  return jax.jit(lambda state: personalization.personalize(
      model, tx, state.params, train, test, jax.random.fold_in(key, state.round), work,
      client_chunk=chunk))
