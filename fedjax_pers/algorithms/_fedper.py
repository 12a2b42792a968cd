"""Personal layers: FedPer (Arivazhagan et al., 2019), LG-FedAvg (Liang et al., 2020) and
FedRep (Collins et al., ICML 2021)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import LocalWork, batch_plan, check_local_work, work_steps
from fedjax_pers.core._client import masked_mean_loss, stack_clients
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import LocalProgram, Steps, tree_where
from fedjax_pers.core._round import FederatedAlgorithm, ServerState, assemble
from fedjax_pers.core._sgd import client_output, fedavg_program, sgd_steps
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
    execution: Execution | None = None,
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
    weighting, execution: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`; `personal(state)` gives each client's full model.
  """
  check_local_work(work)
  template = model.init(jax.random.key(0))
  mask = path_mask(template, last_layer(template) if personal is None else personal)
  if personal is None:
    check_split(mask, "fedper", "personal")

  def make_local(data, client_losses):
    check_local_work(work, data.num_clients)
    return fedavg_program(
        model, client_tx, work, num_classes=data.num_classes, max_examples=data.max_examples,
        min_examples=data.min_examples, client_losses=client_losses)

  return _personal_layers(model, server_tx, mask, make_local, clients_per_round=clients_per_round,
                          weighting=weighting, execution=execution)


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
                     execution) -> FederatedAlgorithm:
  """The round of the personal-layer family around `make_local(data, client_losses)`, a
  `LocalProgram` run from the merged (shared + own personal) parameters, whose
  `finish` reports Δ from them."""
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)

  def make_program(data: FederatedData):
    local = make_local(data, aggregator.client_losses)
    own = lambda params, client: merge(params, () if client.state is None else client.state,
                                       mask)

    def finish(params, client, carry):
      start = own(params, client)
      out = local.finish(start, client, carry)
      ends = jax.tree.map(jnp.add, start, out.delta)
      return out._replace(delta=zero_personal(out.delta, mask),
                          client_state=personal_part(ends, mask))

    return local._replace(
        start=lambda params, client, key: local.start(own(params, client), client, key),
        finish=finish)

  def personal_models(state: ServerState):
    return jax.vmap(lambda own: merge(state.params, own, mask))(state.client_states)

  return assemble(
      model, make_program, aggregator, server_tx, clients_per_round=clients_per_round,
      execution=execution,
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


class FedRepCarry(NamedTuple):
  """A FedRep client: its model, both phases' optimizer states, the body phase's sums,
  and the model at the end of the head phase."""

  w: Any
  head_opt: Any
  body_opt: Any
  loss_sum: jax.Array
  count: jax.Array
  adapted: Any


def _fedrep_program(model, head_tx, body_tx, head_work, work, data, client_losses):
  """FedRep's two phases as one sequence of steps: the head's real steps, then the body's."""
  sizes = dict(max_examples=data.max_examples, min_examples=data.min_examples)

  def start(params, client, key):
    k_plan, k_train, k_body = jax.random.split(key, 3)
    plan = batch_plan(k_plan, client.num_examples, head_work, client_id=client.id, **sizes)
    head = Steps(plan.idx, plan.mask, jax.random.split(k_train, plan.idx.shape[0]))
    body = sgd_steps(k_body, client, work, **sizes)
    s_head, s_body = head.idx.shape[0], body.idx.shape[0]
    width = max(head.idx.shape[1], body.idx.shape[1])
    widen = lambda a: jnp.pad(a, ((0, 0), (0, width - a.shape[1])))
    s = jnp.arange(s_head + s_body)
    in_head = s < work_steps(head_work, client.num_examples, client.id)
    src = jnp.minimum(jnp.where(in_head, s, s_head + s - jnp.sum(in_head)), s.shape[0] - 1)
    cat = lambda a, b: jnp.concatenate([a, b])[src]
    steps = Steps(cat(widen(head.idx), widen(body.idx)), cat(widen(head.mask), widen(body.mask)),
                  (cat(head.extra, body.extra), in_head))
    zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
    return FedRepCarry(params, head_tx.init(params), body_tx.init(params), zero,
                       jnp.zeros((), jnp.int32), params), steps

  def step(params, c, batch):
    key, in_head = batch.extra
    (_, total), g = jax.value_and_grad(
        lambda w: masked_mean_loss(model, w, batch.x, batch.y, batch.mask, key), has_aux=True)(c.w)
    uh, head_opt = head_tx.update(g, c.head_opt, c.w)
    ub, body_opt = body_tx.update(g, c.body_opt, c.w)
    w = optax.apply_updates(c.w, tree_where(in_head, uh, ub))
    body = ~in_head
    return FedRepCarry(
        w, tree_where(in_head, head_opt, c.head_opt), tree_where(body, body_opt, c.body_opt),
        c.loss_sum + jnp.where(body, total, 0).astype(c.loss_sum.dtype),
        c.count + jnp.where(body, jnp.sum(batch.mask, dtype=jnp.int32), 0),
        tree_where(in_head, w, c.adapted))

  def finish(params, client, c):
    out = client_output(model, c.adapted, client, c.w, c.loss_sum, c.count, data.num_classes,
                        client_losses=client_losses)
    return out._replace(delta=jax.tree.map(jnp.subtract, c.w, params))

  def count(client):
    return (work_steps(head_work, client.num_examples, client.id)
            + work_steps(work, client.num_examples, client.id))

  return LocalProgram(start, step, finish, count)


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
    **kwargs: `weighting`, `execution`.
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
    check_local_work(work, data.num_clients)
    check_local_work(head_work, data.num_clients)
    return _fedrep_program(model, head_tx, body_tx, head_work, work, data, client_losses)

  kwargs.setdefault("weighting", None)
  kwargs.setdefault("execution", None)
  return _personal_layers(model, server_tx, mask, make_local,
                          clients_per_round=clients_per_round, **kwargs)
