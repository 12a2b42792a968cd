"""FedBABU (Oh, Kim & Yun, "FedBABU: Toward Enhanced Representation for Federated Image
Classification", ICLR 2022): only the body is learned federatedly."""

from __future__ import annotations

import jax
import optax

from fedjax_pers.aggregation._weights import WeightFn
from fedjax_pers.algorithms._fedavg import fedavg
from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._batching import LocalWork
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm
from fedjax_pers.personalization._layers import Predicate, last_layer, path_mask


def frozen(tx: optax.GradientTransformation, params, head: Predicate
           ) -> optax.GradientTransformation:
  """`tx` on the leaves `head` does not select; exactly zero updates on those it does."""
  mask = path_mask(params, head)
  leaves, treedef = jax.tree.flatten(params)
  labels = jax.tree.unflatten(treedef, ["head" if m else "body" for m in mask])
  return optax.multi_transform({"body": tx, "head": optax.set_to_zero()}, labels)


def fedbabu(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    clients_per_round: int,
    head: Predicate | None = None,
    weighting: WeightFn | Aggregator | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """FedBABU: FedAvg in which the head keeps its random initialisation.

  Clients train the body (every leaf but `head`'s, default the last layer) with
  the head frozen at its initial values, so the body learns a representation
  for a fixed classifier; the server averages bodies and never moves the head
  (its updates are set to zero on the clients and on the server, bit for bit:
  DP noise or a stateful server optimizer cannot move it either). Personalize
  by fine-tuning (the config's `personalization.finetune_steps`: the paper
  fine-tunes the whole model on each client).

  Args:
    model: The model (with a body: a single-layer model would train nothing).
    client_tx, server_tx, work, clients_per_round, weighting, execution: As
      `fedavg`.
    head: Predicate naming the head leaves (default the last layer).

  Returns:
    The `FederatedAlgorithm`.
  """
  template = jax.eval_shape(model.init, jax.random.key(0))
  head = last_layer(template) if head is None else head
  if all(path_mask(template, head)):
    raise ValueError("fedbabu: the head covers every parameter, so nothing would be trained; "
                     "use a model with a body (mlp, cnn) or a narrower head predicate.")
  return fedavg(model, frozen(client_tx, template, head), frozen(server_tx, template, head),
                work, clients_per_round=clients_per_round, weighting=weighting,
                execution=execution)
