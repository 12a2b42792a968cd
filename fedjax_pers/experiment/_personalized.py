"""Personalized evaluation: each client's own model, its adaptation, and clients never seen
in training (`data.holdout_clients`).

Clients never seen in training measure the participation gap (Yuan et al., "What Do
We Mean by Generalization in Federated Learning?", ICLR 2022): a deployment's first
question is how a model trained on some clients serves a client that never took part. The held-out
clients are evaluated with the global model, and personalized the way the
algorithm personalizes a newcomer: by its own adaptation where it has one
(`FederatedAlgorithm.adapt`: a cluster chosen for IFCA, an embedding fitted for
pFedHN), else by fine-tuning the global model for
`personalization.finetune_steps` steps on the client's train split (Per-FedAvg's
steps, FedBABU's fine-tuning, and the fallback for methods whose personal state
exists only for the clients that trained: Ditto, FedRep, ...).

Nothing here touches the training state: the evaluation is a function of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from fedjax_pers import personalization
from fedjax_pers.core import (
    Execution,
    FederatedAlgorithm,
    FederatedData,
    LocalWork,
    Model,
    served,
    summarize,
)
from fedjax_pers.experiment._algorithms import _meta_sgd, cohort_size, make_execution
from fedjax_pers.experiment._registry import make_optimizer

PREFIX = "unseen_"


def adaptation(config: ml_collections.ConfigDict, model: Model, alg: FederatedAlgorithm,
               execution: Execution, key: jax.Array):
  """`fn(state, train, test) -> PersonalizedEval` (jitted) of clients personalized by the
  algorithm's own adaptation (`alg.adapt`: IFCA's cluster choice), then by
  `personalization.finetune_steps` steps of `personalization.optimizer` on their train
  split (from the global model where nothing adapts); None when neither applies. The
  key of round t is `fold_in(key, t)`."""
  c = config.get("personalization")
  steps = 0 if c is None else c.finetune_steps
  if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
    raise ValueError(f"personalization.finetune_steps must be an int >= 0; got {steps!r}.")
  if alg.adapt is None and not steps:
    return None
  # Meta-SGD adapts with its learned per-parameter rates.
  tx = None if not steps else personalization.meta_sgd_tx() if _meta_sgd(config) else (
      make_optimizer(c, "personalization"))
  work = LocalWork(batch_size=c.batch_size, steps=steps) if steps else None

  def fn(state, train, test):
    k = jax.random.fold_in(key, state.round)
    starts = None if alg.adapt is None else alg.adapt(state, train, k)
    return personalization.personalize(model, tx, served(alg, state), train, test, k, work,
                                       execution=execution, starts=starts)

  return jax.jit(fn)


def make_personalized_eval(config: ml_collections.ConfigDict, model: Model,
                           alg: FederatedAlgorithm, train: FederatedData, test: FederatedData):
  """`fn(state) -> PersonalizedEval` (jitted), or None when nothing is personalized.

  An algorithm with personal models (`alg.personal`, e.g. Ditto) is evaluated
  with them. Otherwise each client adapts as `adaptation` says (the algorithm's
  own adaptation, fine-tuning, or both); the key depends on the seed and the
  round only. Either way each client is tested on its test split.
  """
  c = config.get("personalization")
  # The training rounds' devices: the state lives there.
  execution = make_execution(config, cohort_size(config, train.num_clients))
  held_out = config.data.get("holdout_clients")   # newcomers fine-tune (`make_unseen_eval`)
  if alg.personal is not None and c is not None and c.finetune_steps and not held_out:
    raise ValueError(
        f"algorithm={config.algorithm!r} is evaluated with its clients' own models, not by "
        f"fine-tuning; personalization.finetune_steps={c.finetune_steps!r} would be ignored "
        "(it applies to clients held out of training, data.holdout_clients): set it to 0.")
  if alg.personal is not None:
    # The data are arguments, not closed-over constants (XLA would fold them).
    fn = jax.jit(lambda state, test: personalization.evaluate_personal(
        model, alg.personal(state), served(alg, state), test, execution=execution))
    return lambda state: fn(state, test)
  fn = adaptation(config, model, alg, execution,
                  jax.random.fold_in(jax.random.key(config.seed), 1))
  return None if fn is None else lambda state: fn(state, train, test)


def check(config: ml_collections.ConfigDict, alg: FederatedAlgorithm) -> None:
  """Refuses a held-out population the run could not personalize like its seen one."""
  c = config.personalization
  if alg.adapt is None and alg.personal is not None and not c.finetune_steps:
    raise ValueError(
        f"data.holdout_clients={config.data.holdout_clients!r}: algorithm="
        f"{config.algorithm!r} personalizes only the clients that trained, so unseen clients"
        " fine-tune the global model; set personalization.finetune_steps > 0 (got "
        f"{c.finetune_steps!r}).")


def make_unseen_eval(config: ml_collections.ConfigDict, model: Model, alg: FederatedAlgorithm,
                     train: FederatedData, test: FederatedData, seen_clients: int
                     ) -> Callable[[Any], dict[str, Any]]:
  """`fn(state) -> record` of the held-out clients' `unseen_*` figures.

  The record holds the global model's `unseen_test_accuracy`, `unseen_test_loss`,
  `unseen_mean_client_test_accuracy`, `unseen_worst10_client_test_accuracy`, ... and,
  where the run personalizes, `unseen_personalized_test_accuracy`,
  `unseen_worst10_client_personalized_accuracy`, `unseen_fraction_clients_improved`,
  `unseen_mean_client_gain` and the per-client lists (`unseen_per_client_*`). The
  adaptation key is the seen clients' (seed, round) key folded with 2.

  Args:
    config: The run's config.
    model: The model.
    alg: The trained algorithm.
    train, test: The held-out clients' splits.
    seen_clients: Clients in training (the devices the state lives on are theirs).
  """
  check(config, alg)
  execution = make_execution(config, cohort_size(config, seen_clients))
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1), 2)
  adapted = adaptation(config, model, alg, execution, key)
  personal = adapted is not None
  fn = adapted or jax.jit(lambda state, train, test: personalization.personalize(
      model, None, served(alg, state), train, test, key, None))   # the global model only

  def record(state) -> dict[str, Any]:
    ev = fn(state, train, test)
    out = summarize(ev.global_, "test")
    if personal:
      out.update(personalization.summarize_personalization(ev))
    return {PREFIX + k: v for k, v in out.items()}

  return record
