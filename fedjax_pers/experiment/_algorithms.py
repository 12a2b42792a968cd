"""Config names to federated algorithms and their personalized evaluation.

Each algorithm's options come from its config section; settings an algorithm
would not read are refused (`_refuse_ignored`) rather than ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from fedjax_pers import aggregation, algorithms, distributed, personalization
from fedjax_pers.algorithms._pfedme import AVERAGES as PFEDME_AVERAGES
from fedjax_pers.core import (
    Execution,
    FederatedAlgorithm,
    FederatedData,
    LocalWork,
    Model,
    System,
)
from fedjax_pers.experiment import _communication, _privacy
from fedjax_pers.experiment._registry import _pick, make_local_work, make_model, make_optimizer
from fedjax_pers.experiment._weighting import make_weighting, weighting_name

# Algorithms whose global model is an initialization that clients adapt before testing.
ADAPTING = ("finetune", "fedbabu", "per_fedavg", "per_fedavg_fo", "per_fedavg_hf", "reptile")


def _meta_sgd(config: ml_collections.ConfigDict) -> bool:
  return config.algorithm.startswith("per_fedavg") and config.per_fedavg.meta_sgd


def make_run_model(config: ml_collections.ConfigDict, feature_shape, num_classes: int) -> Model:
  """`make_model(config.model, ...)`, with Meta-SGD's per-parameter rates when asked."""
  model = make_model(config.model, feature_shape, num_classes)
  if _meta_sgd(config):
    model = personalization.meta_sgd_model(model, config.per_fedavg.inner_lr)
  return model


def _per_fedavg(config, model, client_tx, server_tx, work, kwargs, hessian):
  """Per-FedAvg from `config.per_fedavg`; `client` is the outer step β (see `per_fedavg`).

  With `meta_sgd`, `model` comes from `make_run_model` (params `MetaSGDParams`).
  `per_fedavg.hessian` picks the second-order form of `per_fedavg`; the `_fo` and
  `_hf` names fix their own.
  """
  c = config.per_fedavg
  if config.algorithm != "per_fedavg" and c.hessian not in ("exact", hessian):
    raise ValueError(
        f"algorithm={config.algorithm!r} fixes its Hessian term (hessian={hessian!r}); "
        f"per_fedavg.hessian must be left at 'exact' (the default) or be {hessian!r}; got "
        f"{c.hessian!r}.")
  return algorithms.per_fedavg(
      model, client_tx, server_tx, work, inner_lr=c.inner_lr, hessian=hessian,
      delta=c.delta, inner_steps=c.inner_steps, meta_sgd=c.meta_sgd, remat=c.remat, **kwargs)


def _plain_server(config) -> dict[str, tuple[Any, Any]]:
  return {"server.optimizer": (config.server.optimizer, "sgd"),
          "server.learning_rate": (config.server.learning_rate, 1.0),
          "server.momentum": (config.server.get("momentum") or 0.0, 0.0)}


def _refuse_ignored(config, what: str, fixed: Mapping[str, tuple[Any, Any]]) -> None:
  """Raises `ValueError` where a config key that `config.algorithm` does not read is set.

  `fixed` maps each key to (its value, the one value the algorithm implies).
  """
  for key, (value, implied) in fixed.items():
    if value != implied:
      raise ValueError(f"algorithm={config.algorithm!r} has {what}; {key} must be {implied!r}"
                       f"; got {value!r}.")


def _reptile(config, model, client_tx, work, kwargs):
  """Reptile: FedAvg whose server step is SGD with rate ε = `reptile.outer_lr`."""
  _refuse_ignored(config, "its own server step (reptile.outer_lr)", _plain_server(config))
  return algorithms.reptile(model, client_tx, work, outer_lr=config.reptile.outer_lr, **kwargs)


def _fednova(config, model, client_tx, server_tx, work, kwargs):
  """FedNova's ‖a_i‖₁ from the clients' optimizer: plain SGD, or heavy-ball momentum."""
  if config.client.optimizer not in ("sgd", "momentum"):
    raise ValueError(f"algorithm='fednova' normalises SGD or momentum steps; got "
                     f"client.optimizer={config.client.optimizer!r}.")
  how = kwargs["weighting"]
  if not isinstance(how, aggregation.WeightFn):
    raise ValueError(f"algorithm='fednova' normalises a weighted mean; aggregation.weighting="
                     f"{weighting_name(config)!r} (or compression / attacks around it) gives "
                     "an aggregator: use a weight function (num_examples, uniform, ...).")
  return algorithms.fednova(model, client_tx, server_tx, work,
                            momentum=config.client.get("momentum") or 0.0, **kwargs)


def _fedbuff(config, model, client_tx, server_tx, work, kwargs, train):
  """FedBuff with K = fedbuff.buffer_size (default clients_per_round) and M =
  fedbuff.concurrency (default 2K, at most N)."""
  c = config.fedbuff
  k = c.get("buffer_size") or config.clients_per_round
  m = c.get("concurrency") or min(2 * k, train.num_clients)
  if config.aggregation.weighting not in ("default", "uniform"):
    raise ValueError(f"algorithm='fedbuff' weights reports by their staleness; "
                     f"aggregation.weighting={config.aggregation.weighting!r} does not apply.")
  return algorithms.fedbuff(model, client_tx, server_tx, work, concurrency=m, buffer_size=k,
                            staleness_exponent=c.staleness_exponent,
                            latency_spread=c.latency_spread, execution=kwargs["execution"])


def _ifca(config, model, client_tx, server_tx, work, kwargs):
  """IFCA with k = ifca.num_clusters, averaging within clusters by a weight function."""
  if not isinstance(kwargs["weighting"], aggregation.WeightFn):
    raise ValueError(f"algorithm='ifca' averages within clusters by a weight function; "
                     f"aggregation.weighting={weighting_name(config)!r} (or privacy, "
                     "compression or attacks around it) gives an aggregator: use num_examples,"
                     " uniform, ...")
  return algorithms.ifca(model, client_tx, server_tx, work,
                         num_clusters=config.ifca.num_clusters, **kwargs)


def _pfedhn(config, model, client_tx, work, kwargs):
  """pFedHN from `config.pfedhn`: its own server step (the hypernetwork's SGD)."""
  _refuse_ignored(config, "its own server step (pfedhn.outer_lr, pfedhn.outer_momentum)",
                  _plain_server(config))
  if not isinstance(kwargs["weighting"], aggregation.WeightFn):
    raise ValueError(f"algorithm='pfedhn' averages the hypernetwork's gradients by a weight "
                     f"function; aggregation.weighting={weighting_name(config)!r} (or privacy,"
                     " compression or attacks around it) gives an aggregator.")
  c = config.pfedhn
  return algorithms.pfedhn(model, client_tx, work, **{k: c[k] for k in (
      "outer_lr", "outer_momentum", "embed_lr", "embed_dim", "hidden", "num_hidden",
      "adapt_steps", "adapt_lr")}, **kwargs)


def _scaffold(config, model, server_tx, work, kwargs):
  """SCAFFOLD's clients take plain SGD steps at client.learning_rate (its c_i formula)."""
  if config.client.optimizer != "sgd" or config.client.get("momentum"):
    raise ValueError(f"algorithm='scaffold' takes plain SGD steps (its control variates "
                     f"assume them); got client.optimizer={config.client.optimizer!r}, "
                     f"client.momentum={config.client.get('momentum')!r}.")
  return algorithms.scaffold(model, work, learning_rate=config.client.learning_rate,
                             server_tx=server_tx, **kwargs)


def _pfedme(config, model, work, kwargs):
  """pFedMe from `config.pfedme`; η = `client.learning_rate`.

  pFedMe fixes what other algorithms take from the config: plain SGD steps, cohorts
  drawn uniformly, a uniform average and the server step β (`pfedme.beta`). Any
  other setting of those keys is refused rather than ignored.
  """
  average = weighting_name(config)
  if average not in PFEDME_AVERAGES:
    raise ValueError(f"algorithm='pfedme' averages by one of {PFEDME_AVERAGES} "
                     f"(aggregation.weighting, or default: uniform); got {average!r}.")
  _refuse_ignored(config, "its own client step, sampling and server step (pfedme.beta), "
                  "and no attack", {
                      "corruption.attack_fraction": (config.corruption.attack_fraction, 0.0),
                      "sampling": (config.get("sampling", "uniform"), "uniform"),
                      "client.optimizer": (config.client.optimizer, "sgd"),
                      "client.momentum": (config.client.get("momentum") or 0.0, 0.0),
                      **_plain_server(config)})
  c = config.pfedme
  return algorithms.pfedme(
      model, work if c.get("local_rounds") is None else LocalWork(
          batch_size=config.client.batch_size, steps=c.local_rounds),
      learning_rate=config.client.learning_rate,
      personal_learning_rate=c.personal_learning_rate, lam=c.lam,
      inner_steps=c.inner_steps, beta=c.beta, clients_per_round=config.clients_per_round,
      average=average, execution=kwargs["execution"])


EXECUTION_KEYS = ("strategy", "client_chunk", "lanes", "num_devices")
SYSTEM_KEYS = ("straggler_fraction", "dropout_rate", "drop_stragglers")


def make_system(config: ml_collections.ConfigDict) -> System | None:
  """`config.system` as a `System`, or None when nothing is simulated.

  A straggler does a whole number of `client.local_epochs` (or of
  `client.local_steps`), uniform in [1, E]; `system.drop_stragglers` defaults to
  the FedProx paper's setting: FedAvg drops stragglers, every other algorithm
  keeps their partial work.
  """
  c = config.get("system")
  if c is None:
    return None
  unknown = sorted(set(c.keys()) - set(SYSTEM_KEYS))
  if unknown:
    raise ValueError(f"Unknown system keys {unknown}; expected some of {list(SYSTEM_KEYS)}.")
  drop = c.get("drop_stragglers")
  drop = config.algorithm == "fedavg" if drop is None else drop
  levels = config.client.get("local_epochs") or config.client.get("local_steps") or 1
  system = System(straggler_fraction=c.get("straggler_fraction", 0.0),
                  levels=int(levels), drop_stragglers=drop,
                  dropout_rate=c.get("dropout_rate", 0.0))
  if not system.active:
    return None
  if config.algorithm == "pfedme":
    raise ValueError("system.* with algorithm='pfedme' is not built (every client trains "
                     "every round, outside the sampled cohort).")
  if config.get("data", {}).get("store") is not None:
    raise ValueError("system.* with data.store is not built (the host feed deals cohorts by "
                     "their full work).")
  return system


def cohort_size(config: ml_collections.ConfigDict, num_clients: int) -> int:
  """Clients that train in a round: all of them for pFedMe, else `clients_per_round`."""
  return num_clients if config.algorithm == "pfedme" else config.clients_per_round


def make_execution(config: ml_collections.ConfigDict, cohort: int,
                   sampling_probs: np.ndarray | None = None) -> Execution:
  """The `Execution` of `config.execution` for cohorts of `cohort` clients.

  `num_devices` None (the default) shards over every device JAX sees, at most
  one per client of the cohort; 1 runs on one device.
  """
  e = config.get("execution") or ml_collections.ConfigDict()
  unknown = sorted(set(e.keys()) - set(EXECUTION_KEYS))
  if unknown:
    raise ValueError(f"Unknown execution option(s) {unknown}; expected {list(EXECUTION_KEYS)}.")
  n = e.get("num_devices")
  if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
    raise ValueError(f"execution.num_devices must be an int >= 1 or None (every device); "
                     f"got {n!r}.")
  n = min(len(jax.devices()), cohort) if n is None else n
  mesh = distributed.client_mesh(n) if n > 1 else None
  return Execution(strategy=e.get("strategy", "auto"), client_chunk=e.get("client_chunk"),
                   lanes=e.get("lanes"), mesh=mesh, sampling_probs=sampling_probs)


# Algorithms whose clients train by `core._sgd.sgd_step`, which keeps a model's batch
# statistics; the others' own steps would leave them at their initial values.
BATCH_STATS_ALGORITHMS = ("fedavg", "fedprox", "finetune", "fedbn", "fedbabu", "fedper",
                          "lg_fedavg", "ifca", "fedala")


def _check_batch_stats(config) -> None:
  """Refuses a model with batch statistics where they would not be kept right."""
  if config.algorithm not in BATCH_STATS_ALGORITHMS:
    raise ValueError(f"model.name={config.model.name!r} keeps batch statistics, which "
                     f"algorithm={config.algorithm!r}'s own client steps do not update; use "
                     f"one of {list(BATCH_STATS_ALGORITHMS)} or a model without batch norm.")
  if config.get("privacy", {}).get("clip_norm") is not None:
    raise ValueError(f"model.name={config.model.name!r} with privacy.clip_norm: clipping and "
                     "noising the running statistics is not built; use a model without "
                     "batch norm.")


def make_algorithm(config: ml_collections.ConfigDict, model: Model, train: FederatedData,
                   *, proxy=None, attackers: np.ndarray | None = None) -> FederatedAlgorithm:
  """The `FederatedAlgorithm` named by `config.algorithm`.

  `config.sampling`: `uniform` cohorts, or `num_examples` (clients drawn with
  probability ∝ n_i without replacement, as FedProx's code samples).
  `config.aggregation.weighting`: see `make_weighting`. `config.privacy.clip_norm`
  set: the DP-FedAvg aggregate instead (`_privacy`), through secure aggregation
  with `secure_aggregation.bits`; `compression.method`: compressed updates
  (`_communication`).
  """
  sampling = config.get("sampling", "uniform")
  probs = _pick({"uniform": None, "num_examples": np.asarray(train.num_examples, np.float64)},
                sampling, "sampling")
  dp = _privacy.make_plan(config, host_sizes(train))
  poisson = dp is not None and dp.sampling == "poisson"
  cohort = dp.max_cohort if poisson else cohort_size(config, train.num_clients)
  execution = make_execution(config, cohort, probs)
  if poisson:
    execution = dataclasses.replace(execution, poisson_rate=dp.sampling_rate)
  system = make_system(config)
  if system is not None:
    execution = dataclasses.replace(execution, system=system)
  kwargs = dict(
      clients_per_round=cohort if poisson else config.clients_per_round,
      weighting=make_weighting(
          config, model, train, proxy, attackers,
          base=None if dp is None else _privacy.aggregator(dp, config),
          encode=_communication.encoder(config, model)),
      execution=execution)
  client_tx = make_optimizer(config.client, "client")
  server_tx = make_optimizer(config.server, "server")
  work = make_local_work(config.client)
  if config.algorithm in ADAPTING and not config.personalization.finetune_steps:
    raise ValueError(f"algorithm={config.algorithm!r} is evaluated after adaptation and needs "
                     "personalization.finetune_steps > 0; got "
                     f"{config.personalization.finetune_steps!r}.")
  if model.batch_stats is not None:
    _check_batch_stats(config)
  table = {
      "fedavg": lambda: algorithms.fedavg(model, client_tx, server_tx, work, **kwargs),
      # FedAvg whose normalisation layers (and their statistics) stay with each client.
      "fedbn": lambda: algorithms.fedbn(model, client_tx, server_tx, work, **kwargs),
      # FedAvg's global model, fine-tuned by every client at each evaluation.
      "finetune": lambda: algorithms.fedavg(model, client_tx, server_tx, work, **kwargs),
      "fedprox": lambda: algorithms.fedprox(model, client_tx, server_tx, work,
                                            mu=config.fedprox.mu, **kwargs),
      "ditto": lambda: algorithms.ditto(model, client_tx, server_tx, work,
                                        lam=config.ditto.lam, **kwargs),
      # Personal layers: the model's last layer (its head) is personal / shared.
      "fedper": lambda: algorithms.fedper(model, client_tx, server_tx, work, **kwargs),
      "lg_fedavg": lambda: algorithms.lg_fedavg(model, client_tx, server_tx, work, **kwargs),
      "pfedme": lambda: _pfedme(config, model, work, kwargs),
      "apfl": lambda: algorithms.apfl(model, client_tx, server_tx, work,
                                      alpha=config.apfl.alpha,
                                      alpha_lr=config.apfl.get("alpha_lr"), **kwargs),
      "per_fedavg": lambda: _per_fedavg(config, model, client_tx, server_tx, work, kwargs,
                                        config.per_fedavg.hessian),
      "per_fedavg_fo": lambda: _per_fedavg(config, model, client_tx, server_tx, work, kwargs,
                                           "none"),
      "per_fedavg_hf": lambda: _per_fedavg(config, model, client_tx, server_tx, work, kwargs,
                                           "finite_difference"),
      "reptile": lambda: _reptile(config, model, client_tx, work, kwargs),
      "scaffold": lambda: _scaffold(config, model, server_tx, work, kwargs),
      # The head stays at its initialisation; evaluated after every client fine-tunes.
      "fedbabu": lambda: algorithms.fedbabu(model, client_tx, server_tx, work, **kwargs),
      "fedbuff": lambda: _fedbuff(config, model, client_tx, server_tx, work, kwargs, train),
      "moon": lambda: algorithms.moon(model, client_tx, server_tx, work, mu=config.moon.mu,
                                      temperature=config.moon.temperature, **kwargs),
      "feddyn": lambda: algorithms.feddyn(model, client_tx, work, alpha=config.feddyn.alpha,
                                          server_tx=server_tx, **kwargs),
      "fedala": lambda: algorithms.fedala(
          model, client_tx, server_tx, work, **{k: config.fedala[k] for k in (
              "eta", "sample_fraction", "threshold", "num_pre_loss", "max_start_epochs")},
          **kwargs),
      # A generic head (balanced softmax) and a personal head per client on one body.
      "fedrod": lambda: algorithms.fedrod(model, client_tx, server_tx, work, **kwargs),
      # k models; each client trains the one of lowest loss on its data.
      "ifca": lambda: _ifca(config, model, client_tx, server_tx, work, kwargs),
      # A server hypernetwork generates each client's model from its embedding.
      "pfedhn": lambda: _pfedhn(config, model, client_tx, work, kwargs),
      "fednova": lambda: _fednova(config, model, client_tx, server_tx, work, kwargs),
      "fedrep": lambda: algorithms.fedrep(
          model, client_tx, server_tx, work,
          head_work=LocalWork(batch_size=config.client.batch_size,
                              steps=config.fedrep.head_steps), **kwargs),
  }
  return _pick(table, config.algorithm, "algorithm")()


def host_sizes(train: FederatedData) -> np.ndarray:
  """Every client's size on the host."""
  if train.sizes is not None:
    return train.sizes
  return np.asarray(jax.tree.map(lambda a: a.addressable_data(0), train.num_examples))
