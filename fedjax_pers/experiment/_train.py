"""`train_and_evaluate`: the run loop around a jitted round."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from fedjax_pers import data, sweep
from fedjax_pers.algorithms._ifca import assignments
from fedjax_pers.core import evaluate, served, summarize
from fedjax_pers.experiment import (
  _algorithms,
  _checkpoint,
  _communication,
  _outputs,
  _personalized,
  _population,
  _privacy,
  _registry,
  _summary,
  _sweep,
  _weighting,
)
from fedjax_pers.personalization import summarize_personalization


def _check_config(config: ml_collections.ConfigDict, num_clients: int) -> None:
  for key in ("num_rounds", "eval_every"):
    v = config[key]
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"config.{key} must be a positive int; got {v!r}.")
  k = config.clients_per_round
  if not isinstance(k, int) or not 1 <= k <= num_clients:
    raise ValueError(
        f"config.clients_per_round must be an int in [1, num_clients] = [1, {num_clients}];"
        f" got {k!r}.")


def _eps(eps: float | None) -> str:
  return "inf" if eps is None else f"{eps:.3g}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs `config.num_rounds` rounds, evaluating every `config.eval_every`.

  Writes into `workdir`: `metrics.jsonl` (one object per evaluation),
  `round_weights.jsonl` (each round's sampled clients and their aggregation
  weights), `summary.json`, `curves.png`, `weights.png` (heatmap of weight by
  client and round), and orbax checkpoints (`checkpoints/`) every
  `config.checkpoint_every` rounds and at the end; a rerun with the same
  workdir resumes from the latest checkpoint.

  With `config.corruption`, the summary adds the accuracy on the clean
  clients' test data and the share of weight and data the corrupted clients
  had in their rounds.

  Args:
    config: The experiment config (see `configs/default.py`).
    workdir: Output directory (created).

  Returns:
    The summary dict also written to `summary.json`.
  """
  os.makedirs(workdir, exist_ok=True)
  t_start = time.perf_counter()
  # Over several processes (`jax.distributed`) every process runs the same rounds
  # and saves its share of each checkpoint; process 0 alone writes the other files.
  primary = jax.process_index() == 0
  if config.data.get("store") is not None or config.data.name == "store":
    if config.data.get("holdout_clients"):
      raise ValueError(f"data.holdout_clients={config.data.holdout_clients!r} with a host "
                       "store (data.store) is not built: hold clients out of an on-device "
                       "population.")
    stores = _population.open_stores(config)
    prepared = None
    num_clients, (feature_shape, num_classes) = stores[0].num_clients, (
        stores[0].feature_shape, stores[0].num_classes)
    corrupted = np.zeros(num_clients, bool)
  else:
    prepared = _registry.prepare_data(config)
    if config.get("eval_clients") is not None:
      raise ValueError(f"config.eval_clients={config.eval_clients!r} samples the clients of "
                       "a host store (data.store); an on-device population is evaluated whole.")
    num_clients = prepared.train.num_clients
    feature_shape, num_classes = prepared.train.feature_shape, prepared.train.num_classes
    corrupted = prepared.noisy | prepared.attackers
  _check_config(config, num_clients)
  variants = _sweep.variants(config)   # None: one run
  model = _algorithms.make_run_model(config, feature_shape, num_classes)
  mesh = _algorithms.make_execution(config, _algorithms.cohort_size(config, num_clients)).mesh
  if prepared is None:
    population = _population.StorePopulation(config, model, mesh, stores)
  else:
    population = _population.DevicePopulation(prepared.train, prepared.test, model, mesh)
  train, test = population.view, population.test
  line = population.line
  if prepared is not None and prepared.proxy is not None:
    line += f"; server proxy set: {len(prepared.proxy[1])} test examples held out"
  logging.info("data: %s", line)
  if primary and config.get("progress", True):
    print(f"data: {line}")
  alg = _algorithms.make_algorithm(
      config, model, train, proxy=None if prepared is None else prepared.proxy,
      attackers=None if prepared is None else prepared.attackers)

  if prepared is None and (alg.adapt is not None or alg.serve is not None):
    raise ValueError(f"algorithm={config.algorithm!r} with a host store (data.store) is not "
                     "built (its evaluation adapts every client on the device).")
  dp = _privacy.make_plan(config, _algorithms.host_sizes(train))
  comm = _communication.plan(config, model)
  alg_system = _algorithms.make_system(config)
  build = lambda c: _algorithms.make_algorithm(
      c, model, train, proxy=None if prepared is None else prepared.proxy,
      attackers=None if prepared is None else prepared.attackers)
  if variants is None:
    configs, algs = [config], [alg]
    state = alg.init(jax.random.key(config.seed), train)
  else:
    if prepared is None or dp is not None:
      raise ValueError(f"sweep.seeds={config.sweep.seeds!r}, sweep.grid="
                       f"{config.sweep.grid!r}: a sweep runs on an on-device population "
                       "without privacy.* (" + ("data.store is set" if prepared is None else
                       "privacy.clip_norm is set") + "); run the variants one by one.")
    configs = [_sweep.config_of(config, v) for v in variants]
    algs = [build(c) for c in configs]   # checks every variant's numbers
    state = sweep.stack([a.init(jax.random.key(c.seed), train) for a, c in zip(algs, configs)])
  mngr = _checkpoint.manager(workdir)
  _checkpoint.check_same_run(workdir, config, resuming=mngr.latest_step() is not None)
  restored = _checkpoint.restore_latest(mngr, state)
  state = state if restored is None else restored
  done_before = int(np.max(state.round)) if restored is not None else -1
  dirs = [workdir] if variants is None else [
      os.path.join(workdir, "variants", v.name) for v in variants]
  files = [_outputs.RunFiles(d, primary=primary, tensorboard=config.get("tensorboard", True),
                             done=done_before) for d in dirs]

  if variants is None:
    round_fn, chunk_report = jax.jit(alg.round), None
  else:
    round_fn, chunk_report = _sweep_round(config, variants, build, state, population.view)
  state, run_round = population.start(alg, state, round_fn, workdir,
                                      None if restored is None else done_before)
  if prepared is None:
    pers_fns, unseen_fns = [population.personalized()], [None]
  else:
    pers_fns = [_personalized.make_personalized_eval(c, model, a, train, test)
                for c, a in zip(configs, algs)]
    unseen_fns = [None if prepared.unseen is None else _personalized.make_unseen_eval(
        c, model, a, *prepared.unseen, num_clients) for c, a in zip(configs, algs)]
  groups = None if prepared is None else prepared.groups
  cluster_of = jax.jit(lambda models, d: assignments(model, models, d))
  pick = (lambda tree, s: tree) if variants is None else sweep.take

  def evaluate_now(s, state, train_losses, done=None):
    """Variant s's record; `done(split)`: its global model's evaluation if made already."""
    alg, pers_fn, unseen_fn = algs[s], pers_fns[s], unseen_fns[s]
    rec = {"round": int(state.round)}
    glob = served(alg, state)   # the global model (IFCA: its most chosen cluster's)
    ev = (lambda split: population.evaluate(glob, split)) if done is None else done
    rec.update(summarize(ev("test"), "test"))
    per_client = rec.pop("per_client_test_accuracy")
    lists = {"per_client_test_accuracy": per_client}
    if pers_fn is not None:
      pers = summarize_personalization(pers_fn(state))
      lists.update({k: pers.pop(k) for k in list(pers) if k.startswith("per_client")})
      rec.update(pers)
    if unseen_fn is not None:   # the clients held out of training
      unseen = unseen_fn(state)
      lists.update({k: unseen.pop(k) for k in list(unseen) if "per_client" in k})
      rec.update(unseen)
    if corrupted.any():
      clean = ~corrupted
      acc = np.asarray(per_client)
      n = np.asarray(test.num_examples, np.float64)
      rec["clean_client_test_accuracy"] = float(np.sum((n * acc)[clean]) / np.sum(n[clean]))
      rec["mean_clean_client_test_accuracy"] = float(acc[clean].mean())
    if config.get("eval_train", True):
      tr = summarize(ev("train"), "train")
      rec["train_loss"], rec["train_accuracy"] = tr["train_loss"], tr["train_accuracy"]
    if train_losses:
      rec["local_train_loss"] = float(np.mean(jax.device_get(train_losses)))
    if dp is not None:   # ε of the rounds so far (computed afresh: resumes agree)
      rec.update(dp.report(int(state.round), state.weight_state))
    if comm is not None:
      rec.update(comm.report())
    if groups is not None and hasattr(state.client_states, "cluster"):   # IFCA on known groups
      chosen = np.asarray(cluster_of(state.params, train))   # every client's choice now
      rec["cluster_recovery"] = data.cluster_recovery(chosen, groups)
    if hasattr(state.algorithm, "clock"):   # an asynchronous server's simulated time
      rec["simulated_time"] = float(state.algorithm.clock)
    rec["elapsed_seconds"] = round(time.perf_counter() - t_start, 3)
    return rec, lists

  # A sweep evaluates every variant's global model in one call (vmapped).
  served_all = jax.jit(jax.vmap(lambda st: served(alg, st)))
  evaluate_vmapped = jax.jit(jax.vmap(lambda p, d: evaluate(model, p, d), in_axes=(0, None)))

  def evaluate_all(state, train_losses):
    if variants is None:
      out = [evaluate_now(0, state, train_losses)]
    else:
      glob = served_all(state)
      splits = {"test": population.test}
      if config.get("eval_train", True):
        splits["train"] = population.view
      evals = {k: jax.device_get(evaluate_vmapped(glob, d)) for k, d in splits.items()}
      out = [evaluate_now(s, pick(state, s), [pick(x, s) for x in train_losses],
                          done=lambda split, s=s: pick(evals[split], s))
             for s in range(len(files))]
    return [rec for rec, _ in out], [lists for _, lists in out]

  first = done_before if done_before >= 0 else 0
  if first == 0:
    for f, rec in zip(files, evaluate_all(state, [])[0]):
      f.evaluation(rec)
  compile_seconds, round_seconds, train_losses = 0.0, [], []
  steps = np.zeros((len(files), 2), np.int64)   # each run's real and executed client-steps
  bar = tqdm.trange(first, config.num_rounds, desc="rounds", unit="round",
                    disable=not (primary and config.get("progress", True)))
  for r in bar:
    t0 = time.perf_counter()
    state, m = run_round(state)
    train_losses.append(m.train_loss)
    jax.block_until_ready(state)
    fetched = jax.device_get(
        (m.clients, m.weights, m.real_steps, m.executed_steps, m.present, m.stragglers))
    cluster = (np.asarray(state.client_states.cluster)
               if hasattr(state.client_states, "cluster") else None)
    mixtures = _weighting.learned_mixtures(state.weight_state, len(files))
    for s, f in enumerate(files):
      clients, weights, real, executed, present, stragglers = pick(fetched, s)
      steps[s] += (int(real), int(executed))
      row = {"round": r + 1, "clients": clients[present].tolist(),
             "weights": [round(float(w), 6) for w in weights[present]]}
      if dp is not None and dp.sampling == "poisson":   # the realised Poisson cohort
        row["cohort_size"] = int(present.sum())
      if alg_system is not None:   # who straggled, who never reported
        row["stragglers"] = clients[stragglers].tolist()
        row["not_reported"] = clients[~present].tolist()
      if cluster is not None:   # the clusters the cohort chose (IFCA)
        row["clusters"] = pick(cluster, s)[clients[present]].tolist()
      if mixtures is not None:   # aggregation.weighting='auto': the learned mixture
        row.update(mixtures[s])
      f.round(row)
    if r == first:
      compile_seconds = time.perf_counter() - t0
    else:
      round_seconds.append(time.perf_counter() - t0)
    done = r + 1
    if done % config.eval_every == 0 or done == config.num_rounds:
      recs, lists_all = evaluate_all(state, train_losses)
      train_losses = []
      for f, rec in zip(files, recs):
        f.evaluation(rec)
      rec = recs[0]
      bar.set_postfix(acc=f"{rec['test_accuracy']:.4f}", loss=f"{rec['test_loss']:.4f}",
                      **({} if dp is None else {"eps": _eps(rec["dp_epsilon"])}))
    every = config.get("checkpoint_every", 0)
    if (every and done % every == 0) or done == config.num_rounds:
      _checkpoint.save(mngr, state)
      population.checkpoint(done, mngr.all_steps())
  mngr.wait_until_finished()
  population.close()
  for f in files:
    f.close()

  if int(np.max(state.round)) == first:   # nothing left to run: evaluate the restored state
    recs, lists_all = evaluate_all(state, [])
    for f, rec in zip(files, recs):
      f.records[-1:] = [rec]
  timing = {"wall_seconds": round(time.perf_counter() - t_start, 3),
            "compile_and_first_round_seconds": round(compile_seconds, 3),
            "seconds_per_round": float(np.median(round_seconds)) if round_seconds else 0.0}
  summaries = []
  for s, f in enumerate(files):
    summaries.append(_summary.run_summary(
        configs[s], f, lists_all[s], pick(state, s), timing, steps[s], algs[s], train, population,
        prepared, dp, comm, corrupted, primary, resumed_finished=not round_seconds,
        plots=variants is None))   # a sweep plots its variants together (bands), below
  if variants is None:
    return summaries[0]
  across = _sweep.summarize(config, variants, summaries, [f.records for f in files])
  across.update(timing, rounds=int(np.max(state.round)), chunk=chunk_report,
                backend=jax.default_backend())
  if primary:
    _outputs.write_json(os.path.join(workdir, "summary.json"), across)
    _sweep.plot_bands(variants, [f.records for f in files], os.path.join(workdir, "curves.png"),
                      title=f"{config.algorithm} on {config.data.name}, {len(variants)} runs")
    if "groups" not in across:   # seeds only: the seeds' mean evaluations, as one run's
      _outputs.write_text(os.path.join(workdir, "metrics.jsonl"), "".join(
          json.dumps(r) + "\n" for r in _sweep.mean_records([f.records for f in files])))
  return across


def _sweep_round(config, variants, build, state, view):
  """The sweep's round and how it runs its variants (see `fedjax_pers.sweep.choose`)."""
  keys = tuple(k for k, _ in variants[0].values)
  hypers = jnp.asarray([[v for _, v in var.values] for var in variants], jnp.float32
                       ).reshape(len(variants), len(keys))
  one = _sweep.round_of(config, keys, build)
  _sweep.check_traceable(one, keys, tuple(hypers[0]), sweep.take(state, 0), view,
                         config.algorithm)
  if config.sweep.chunk is not None:
    return (sweep.dispatched(one, hypers, len(variants), config.sweep.chunk),
            {"chunk": min(config.sweep.chunk, len(variants)), "set_by_config": True})
  chunk, step, report = sweep.choose(one, hypers, state, view)
  if not report["fits_at_once"]:
    logging.warning("sweep: %d variants need %.2f GiB at once, more than fits; %d at a time.",
                    len(variants), report["all_at_once_bytes"] / 2**30, chunk)
    print(f"sweep: {len(variants)} variants do not fit in memory at once "
          f"({report['all_at_once_bytes'] / 2**30:.2f} GiB of "
          f"{report['budget_bytes'] / 2**30:.2f}); running {chunk} at a time.")
  return step, report
