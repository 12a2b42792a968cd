"""Clients never seen in training (`data.holdout_clients`): how the model does on them.

The participation gap (Yuan et al., "What Do We Mean by Generalization in
Federated Learning?", ICLR 2022): a deployment's first question is how a model
trained on some clients serves a client that never took part. The held-out
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
from fedjax_pers.core import FederatedAlgorithm, FederatedData, Model, served, summarize
from fedjax_pers.experiment._algorithms import adaptation, cohort_size, make_execution

PREFIX = "unseen_"


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
