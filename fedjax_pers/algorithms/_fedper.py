"""Personal layers: FedPer (Arivazhagan et al., 2019), LG-FedAvg (Liang et al., 2020) and
FedRep (Collins et al., ICML 2021)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import LocalWork, batch_plan, check_local_work
from fedjax_pers.core._client import local_train, make_client_update, stack_clients
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm, ServerState, assemble
from fedjax_pers.personalization._layers import (
    Predicate,
    last_layer,
    merge,
    path_mask,
    personal_part,
    zero_personal,
)


def fedper(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    clients_per_round: int,
    personal: Predicate | None = None,
    weighting: WeightFn | Aggregator | None = None,
    strategy: str = "auto",
    client_chunk: int | None = None,
    sampling_probs: np.ndarray | None = None,
    mesh: Mesh | None = None,
) -> FederatedAlgorithm:
  """FedPer: every client keeps its own copy of the personal layers; only the rest is averaged.

  A sampled client trains all parameters jointly from (shared w_t, its own
  personal layers); the personal part of the result becomes its new personal
  layers (kept stacked over clients in `ServerState.client_states`), and the
  shared part's update is aggregated as in FedAvg. The server's copy of the
  personal layers is never updated. An empty personal set is FedAvg.

  Args:
    model: The model.
    client_tx, server_tx, work: As `fedavg`.
    clients_per_round: Cohort size.
    personal: Predicate over parameter paths (`jax.tree_util.keystr`, e.g.
      `"['Dense_1']['kernel']"`) naming the personal leaves; default the last
      top-level layer (FedPer's personalized head; a one-layer model is refused).
      LG-FedAvg is the complement (`lg_fedavg`). A predicate selecting nothing
      gives FedAvg, one selecting everything local training only.
    weighting, strategy, client_chunk, sampling_probs, mesh: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`; `personal(state)` gives each client's full model.
  """
  check_local_work(work)
  template = model.init(jax.random.key(0))
  mask = path_mask(template, last_layer(template) if personal is None else personal)
  if personal is None:
    check_split(mask, "fedper", "personal")

  def make_local(data, client_losses):
    return make_client_update(
        model, client_tx, work, num_classes=data.num_classes, max_examples=data.max_examples,
        min_examples=data.min_examples, client_losses=client_losses)

  return _personal_layers(model, server_tx, mask, make_local, clients_per_round=clients_per_round,
                          weighting=weighting, strategy=strategy, client_chunk=client_chunk,
                          sampling_probs=sampling_probs, mesh=mesh)


def check_split(mask: list[bool], algorithm: str, part: str) -> None:
  """Raises `ValueError` when the default split (the last layer) leaves nothing to share.

  An explicit predicate may select nothing (FedAvg) or everything (local
  training); the default one doing so means a one-layer model.
  """
  if all(mask) or not any(mask):
    raise ValueError(
        f"{algorithm}: its default {part} part, the model's last layer, is all {len(mask)} of "
        "its parameter arrays, so nothing would be " + ("shared" if part != "shared" else
                                                        "personal") +
        " (a one-layer model such as logistic_regression). Use an mlp or a cnn, or pass a "
        f"`{part}` predicate.")


def _personal_layers(model, server_tx, mask, make_local, *, clients_per_round, weighting,
                     strategy, client_chunk, sampling_probs, mesh) -> FederatedAlgorithm:
  """The round of the personal-layer family around `make_local(data, client_losses)`, a
  client update from the merged (shared + own personal) parameters."""
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)

  def make_client(data: FederatedData):
    local_update = make_local(data, aggregator.client_losses)

    def client_update(params, client, key):
      start = merge(params, () if client.state is None else client.state, mask)
      out = local_update(start, client, key)
      local = jax.tree.map(jnp.add, start, out.delta)
      return out._replace(delta=zero_personal(out.delta, mask),
                          client_state=personal_part(local, mask))

    return client_update

  def personal_models(state: ServerState):
    return jax.vmap(lambda own: merge(state.params, own, mask))(state.client_states)

  return assemble(
      model, make_client, aggregator, server_tx, clients_per_round=clients_per_round,
      strategy=strategy, client_chunk=client_chunk, sampling_probs=sampling_probs, mesh=mesh,
      client_states=lambda params, n: stack_clients(personal_part(params, mask), n),
      personal=personal_models)


def lg_fedavg(model: Model, client_tx, server_tx, work: LocalWork, *,
              clients_per_round: int, shared: Predicate | None = None, **kwargs
              ) -> FederatedAlgorithm:
  """LG-FedAvg (Liang et al., 2020): personal lower layers (the representation), a shared head.

  `fedper` with the personal set reversed: `shared` names the averaged leaves
  (default the last layer); every other leaf stays with its client.
  """
  template = model.init(jax.random.key(0))
  is_shared = last_layer(template) if shared is None else shared
  if shared is None:
    check_split(path_mask(template, is_shared), "lg_fedavg", "shared")
  return fedper(model, client_tx, server_tx, work, clients_per_round=clients_per_round,
                personal=lambda path: not is_shared(path), **kwargs)


def _frozen(tx: optax.GradientTransformation, params, trainable: list[bool]):
  """`tx` on the `trainable` leaves, zero updates on the others."""
  leaves, treedef = jax.tree.flatten(params)
  labels = jax.tree.unflatten(treedef, ["train" if t else "freeze" for t in trainable])
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def fedrep(model: Model, client_tx, server_tx, work: LocalWork, *, clients_per_round: int,
           head_work: LocalWork, head: Predicate | None = None, **kwargs
           ) -> FederatedAlgorithm:
  """FedRep: a shared representation (body) and a personal head, trained in turn.

  A sampled client first trains its own head with the body frozen
  (`head_work`, e.g. several epochs), then the body with the head frozen
  (`work`, e.g. one epoch), both with `client_tx`; the body's update is
  averaged by the server and the head stays with the client.

  Args:
    model: The model.
    client_tx, server_tx: As `fedavg`.
    work: Local work of the body phase.
    clients_per_round: Cohort size.
    head_work: Local work of the head phase.
    head: Predicate naming the head leaves (default the last layer).
    **kwargs: `weighting`, `strategy`, `client_chunk`, `sampling_probs`, `mesh`.
  """
  check_local_work(work)
  check_local_work(head_work)
  template = model.init(jax.random.key(0))
  mask = path_mask(template, last_layer(template) if head is None else head)
  if head is None:
    check_split(mask, "fedrep", "head")
  head_tx = _frozen(client_tx, template, mask)
  body_tx = _frozen(client_tx, template, [not m for m in mask])

  def make_local(data, client_losses):
    body = make_client_update(
        model, body_tx, work, num_classes=data.num_classes, max_examples=data.max_examples,
        min_examples=data.min_examples, client_losses=client_losses)

    def local_update(start, client, key):
      k_plan, k_train, k_body = jax.random.split(key, 3)
      plan = batch_plan(k_plan, client.num_examples, head_work,
                        max_examples=data.max_examples, min_examples=data.min_examples)
      adapted, *_ = local_train(model, head_tx, start, client, plan, k_train,
                                guard_empty_steps=head_work.epochs is not None)
      out = body(adapted, client, k_body)
      local = jax.tree.map(jnp.add, adapted, out.delta)
      return out._replace(delta=jax.tree.map(jnp.subtract, local, start))

    return local_update

  kwargs.setdefault("weighting", None)
  for name in ("strategy", "client_chunk", "sampling_probs", "mesh"):
    kwargs.setdefault(name, {"strategy": "auto"}.get(name))
  return _personal_layers(model, server_tx, mask, make_local,
                          clients_per_round=clients_per_round, **kwargs)
