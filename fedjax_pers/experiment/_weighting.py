"""Config names to weight functions and aggregators (`config.aggregation`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from fedjax_pers import aggregation
from fedjax_pers.core import FederatedData, Model

# `aggregation.weighting='default'`: the weighting of the algorithm's paper. Per-FedAvg,
# Reptile and pFedMe average the cohort uniformly ((1/rn) Σ w_i); the others weight by n_i.
PAPER_WEIGHTING = {"per_fedavg": "uniform", "per_fedavg_fo": "uniform",
                   "per_fedavg_hf": "uniform", "reptile": "uniform", "pfedme": "uniform",
                   "scaffold": "uniform", "feddyn": "uniform", "fedbuff": "uniform",
                   "pfedhn": "uniform"}


def weighting_name(config: ml_collections.ConfigDict) -> str:
  """`config.aggregation.weighting`, with `default` resolved for `config.algorithm`.

  With `sampling='num_examples'` (clients drawn with probability ∝ n_i) the
  default is `uniform`: the sampling already favours large clients, and
  weighting by n_i again would count them twice (FedProx's Algorithm 2 samples
  ∝ n_i and averages uniformly).
  """
  name = config.aggregation.weighting
  if name != "default":
    return name
  if config.get("sampling", "uniform") == "num_examples":
    return "uniform"
  return PAPER_WEIGHTING.get(config.algorithm, "num_examples")


# The weightings that learn on the server's proxy set, and its size when not set.
LEARNED = ("fedlaw", "auto")
DEFAULT_PROXY_EXAMPLES = 100


def proxy_examples(config: ml_collections.ConfigDict) -> int:
  """`data.proxy_examples`, with None resolved: `DEFAULT_PROXY_EXAMPLES` test examples
  when the weighting learns on a proxy set (`LEARNED`), else none."""
  m = config.data.get("proxy_examples")
  if m is not None:
    if not (isinstance(m, int) and m >= 0):
      raise ValueError(f"data.proxy_examples must be an int >= 0 or None; got {m!r}.")
    return m
  names = config.aggregation.weighting.split("*")
  return DEFAULT_PROXY_EXAMPLES if any(n in LEARNED for n in names) else 0


def _population(c: ml_collections.ConfigDict, train: FederatedData):
  if c.population == "cohort":
    return None
  if c.population == "data":
    hist = np.bincount(np.concatenate([train.client(i)[1] for i in range(train.num_clients)]),
                       minlength=train.num_classes)
    return hist / hist.sum()
  raise ValueError(
      f"aggregation.population must be 'cohort' or 'data'; got {c.population!r}.")


def weighting_table(config: ml_collections.ConfigDict, model: Model, train: FederatedData,
                    proxy) -> dict[str, Callable[[], object]]:
  """Every name `config.aggregation.weighting` accepts, with its options from the config."""
  c = config.aggregation

  def fedlaw():
    if proxy is None:
      raise ValueError("aggregation.weighting='fedlaw' needs a server proxy set: set "
                       "data.proxy_examples > 0.")
    import optax

    return aggregation.fedlaw(model, *proxy, steps=c.fedlaw_steps,
                              optimizer=optax.adam(c.fedlaw_learning_rate))

  def auto():
    if proxy is None:
      raise ValueError("aggregation.weighting='auto' needs a server proxy set: set "
                       "data.proxy_examples > 0.")
    import optax

    from fedjax_pers.hypergrad import held_out_loss

    return aggregation.auto(held_out_loss(model, *proxy), steps=c.auto_steps,
                            optimizer=optax.adam(c.auto_learning_rate),
                            population=_population(c, train), fedlaw_steps=c.fedlaw_steps,
                            fedlaw_optimizer=optax.adam(c.fedlaw_learning_rate))

  return {
      # weighted means (WeightFn): composable with '*', power and floor
      "num_examples": aggregation.num_examples,
      "uniform": aggregation.uniform,
      "loss": lambda: aggregation.loss(c.temperature),
      "loss_improvement": lambda: aggregation.loss_improvement(c.temperature),
      "cosine": aggregation.cosine,
      "fedadp": lambda: aggregation.fedadp(c.fedadp_alpha),
      "label_divergence": lambda: aggregation.label_divergence(
          c.temperature, _population(c, train)),
      "label_entropy": lambda: aggregation.label_entropy(c.temperature),
      # aggregators
      "q_ffl": lambda: aggregation.q_ffl(c.q, config.client.learning_rate),
      "fedlaw": fedlaw,
      "auto": auto,
      "median": aggregation.median,
      "trimmed_mean": lambda: aggregation.trimmed_mean(c.trim_beta),
      "krum": lambda: aggregation.krum(c.byzantine_f),
      "multi_krum": lambda: aggregation.multi_krum(c.byzantine_f, c.get("multi_krum_m")),
      "clip_norm": lambda: aggregation.clip_norm(c.max_norm),
  }


def make_weighting(config: ml_collections.ConfigDict, model: Model, train: FederatedData,
                   proxy=None, attackers: np.ndarray | None = None, base=None,
                   encode=None):
  """The `WeightFn` or `Aggregator` named by `config.aggregation.weighting`.

  `default` is the algorithm's own (`weighting_name`).
  Names joined by `*` multiply weight functions (`num_examples*label_divergence`);
  `aggregation.power` and `aggregation.floor` then sharpen/flatten and floor
  them. With `attackers` (a client mask), those clients send
  `corruption.attack_scale` times their update. `base`: an aggregator that
  replaces the configured weighting (DP-FedAvg's), attackers still applied.
  `encode`: `aggregator -> aggregator` of the clients' compression, between the
  attackers (who compress what they send) and the weighting.
  """
  if base is not None:
    return _attacked(config, base if encode is None else encode(base), attackers)
  c = config.aggregation
  table = weighting_table(config, model, train, proxy)
  weighting = weighting_name(config)
  names = weighting.split("*")
  for name in names:
    if name not in table:
      raise ValueError(
          f"Unknown aggregation.weighting {name!r}; expected 'default', one of "
          f"{sorted(table)}, or weight functions joined by '*'.")
  parts = [table[name]() for name in names]
  is_weight = [isinstance(p, aggregation.WeightFn) for p in parts]
  if not all(is_weight) and (len(parts) > 1 or c.power != 1.0 or c.floor != 0.0):
    raise ValueError(
        f"aggregation.weighting={weighting!r}: only weight functions (not aggregators) "
        "combine with '*', aggregation.power and aggregation.floor.")
  how = parts[0] if len(parts) == 1 else aggregation.product(*parts)
  if all(is_weight):
    if c.power != 1.0:
      how = aggregation.power(how, c.power)
    if c.floor != 0.0:
      how = aggregation.floor(how, c.floor)
  return _attacked(config, how if encode is None else encode(how), attackers)


def _attacked(config: ml_collections.ConfigDict, how, attackers: np.ndarray | None):
  """`how` with the `attackers`' updates scaled by `corruption.attack_scale`."""
  if attackers is not None and attackers.any():
    how = aggregation.scaled_updates(how, attackers, config.corruption.attack_scale)
  return how


def learned_mixtures(weight_state, num_runs: int) -> list[dict] | None:
  """Each run's `{'mixture': π by family, 'temperatures': τ by family, 'gamma': γ}` of an
  automated weighting's state anywhere in `weight_state` (a sweep's: stacked over its `num_runs`
  variants), fetched from the device once; None without one."""
  found = [s for s in jax.tree.leaves(weight_state, is_leaf=lambda x: isinstance(
      x, aggregation.AutoState)) if isinstance(s, aggregation.AutoState)]
  if not found:
    return None
  logits, log_tau, gamma = jax.device_get((found[0].logits, found[0].log_temperature,
                                           found[0].gamma))
  logits, log_tau = np.reshape(logits, (num_runs, -1)), np.reshape(log_tau, (num_runs, -1))
  gamma = np.reshape(gamma, (num_runs,))
  pi = np.exp(logits - logits.max(1, keepdims=True))
  pi /= pi.sum(1, keepdims=True)
  return [{"mixture": {k: round(float(v), 6) for k, v in zip(aggregation.FAMILIES, p)},
           "temperatures": {k: round(float(v), 6) for k, v in zip(
               aggregation.TEMPERED, np.exp(t))}, "gamma": round(float(g), 6)}
          for p, t, g in zip(pi, log_tau, gamma)]
