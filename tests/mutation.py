"""The mutation pass: mutmut over one package, each package against its own test files.

  pip install -e '.[dev,mutation]'
  python tests/mutation.py aggregation [--max-children 2] [--workdir DIR] [names...]
  python tests/mutation.py core --module _batching [--module _model ...]

mutmut (3.8) copies the project into `DIR/mutants/`, turns every function of the
package's files into a trampoline that runs the original or one mutant, records which
tests reach each function (a "stats" run of the package's test files), and runs each
mutant against those tests only. The run happens in a scratch copy of this working tree
(`DIR`, default `/tmp/fedjax_pers_mutation/<package>`) whose `pyproject.toml` gets
this package's `[tool.mutmut]` section, so the checkout is never touched;
`../shared` is linked in for the data-set tests. JAX is multithreaded, so mutants run
in fresh processes from a fork server (`process_isolation = "forkserver"`): mutmut's
default forks the process that already started JAX, and those children deadlock. The
fork server imports the test modules, so a test module must not start JAX's backend when
imported (no arrays at module level: build them in a cached function), or every mutant
hangs until its timeout.

It prints every file's and the package's kill rate: killed (a test failed, or the
mutant hung past mutmut's timeout) over every mutant except those `tests/MUTANTS.md`
lists as equivalent (a line "- `mutant name`: why"). Mutants that no test reaches
count as survivors. Survivors are printed by name: `mutmut show NAME` (run in `DIR`)
shows the change. Extra `names` (fnmatch globs of mutant names) rerun just those;
`--survivors-of DIR` reruns, in a fresh workdir, every mutant an earlier run did not
kill: its survivors, the mutants it did not reach (a pass stopped halfway) and those of
functions changed since (mutmut renumbers them); it reports the merge. A fresh workdir,
because new tests would reset mutmut's results in the old one. The workdir lives in /tmp,
which a new machine does not have: `--save FILE` writes the merged statuses compactly
(`tests/mutation_results/PACKAGE.json` is committed), and `--survivors-of FILE` resumes
from it. `--sample K` checks K mutants of each file, drawn at random among those
not checked: an estimate when the whole pass does not fit in a session.
`--module` (core, algorithms) mutates only some files of a package and runs each against its
own tests (`MODULES`); `--save` keeps the saved statuses of the other files.
mutmut's timeout counts CPU seconds; a thread here sends a mutant's process that has
used none for 3 minutes (a deadlock) the same signal (SIGXCPU): a timeout, not a hang.
The pass is slow, so it is not part of CI: on 2 cores a mutant costs 1-3 s in a leaf
function and 20-50 s in a helper that most tests reach (each mutant compiles afresh),
plus a few minutes for the stats run; the aggregation package's 1,804 mutants took
about 2 hours in all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each package's own tests: the files that test its modules directly. The end-to-end
# files, which run subprocesses or whole experiments, are left out, and so are the tests
# marked `run` (a whole experiment from a config) in these files: they reach most
# functions and would only slow every mutant down, and a mutant only they catch is a
# gap in the unit tests.
PACKAGES = {
    "aggregation": ["test_aggregation.py", "test_aggregation_round.py",
                    "test_aggregation_edges.py", "test_auto_weighting.py",
                    "test_fednova.py"],
    "core": ["test_engine.py", "test_batching.py", "test_execution.py", "test_cap.py",
             "test_system.py", "test_poisson.py", "test_arrays.py", "test_models.py",
             "test_distributed.py", "test_store.py", "test_data.py", "test_core_edges.py",
             "test_client.py", "test_sampling.py", "test_evaluate.py", "test_sgd.py",
             "test_program.py", "test_cohort.py", "test_round.py"],
    "algorithms": ["test_algorithm_options.py", "test_apfl.py", "test_ditto.py",
                   "test_fedala.py", "test_fedbabu.py", "test_fedbn.py", "test_fedbuff.py",
                   "test_feddyn.py", "test_fednova.py",
                   "test_fedper.py", "test_fedrod.py", "test_ifca.py", "test_moon.py",
                   "test_pfedhn.py", "test_pfedme.py", "test_scaffold.py", "test_meta.py",
                   "test_engine.py"],
    "personalization": ["test_finetune.py", "test_meta.py", "test_fedper.py",
                        "test_fedrod.py", "test_ditto.py", "test_unseen.py", "test_cap.py"],
}
# The core package is too large for one pass: its helpers are reached by nearly every
# core test (about 6 minutes of tests), and a surviving mutant runs all of them, so the
# whole package would take days on 2 cores. `--module` runs one of its files against
# that file's own tests; a mutant only another file's tests catch is a gap in the unit
# tests of its own file.
ENGINE = ["test_engine.py", "test_client.py", "test_core_edges.py"]
MODULES = {"core": {
    "_aggregate": ENGINE, "_client": ENGINE, "_cohort": ENGINE + ["test_cohort.py"],
    "_program": ENGINE + ["test_program.py"],
    # The round's Poisson slots and simulated stragglers and dropouts: their own tests.
    "_round": ENGINE + ["test_round.py", "test_poisson.py", "test_system.py"],
    "_sgd": ENGINE + ["test_sgd.py"], "_source": ENGINE,
    "_batching": ["test_batching.py", "test_core_edges.py"],
    "_data": ["test_data.py", "test_arrays.py", "test_cap.py", "test_core_edges.py"],
    "_evaluate": ["test_evaluate.py", "test_core_edges.py"],
    "_execution": ["test_execution.py", "test_core_edges.py"],
    "_lanes": ["test_execution.py", "test_cohort.py"],
    "_model": ["test_models.py", "test_core_edges.py"],
    "_sampling": ["test_sampling.py", "test_poisson.py", "test_core_edges.py"],
    "_system": ["test_system.py", "test_core_edges.py"],
}, "algorithms": {
    # `test_algorithm_options` runs every algorithm through the shared options (losses,
    # server optimizers, sweeps, refusals).
    f"_{name}": [f"test_{test}.py", "test_algorithm_options.py"] for name, test in (
        ("apfl", "apfl"), ("ditto", "ditto"), ("fedala", "fedala"), ("fedavg", "engine"),
        ("fedbabu", "fedbabu"), ("fedbn", "fedbn"), ("fedbuff", "fedbuff"),
        ("feddyn", "feddyn"), ("fednova", "fednova"), ("fedper", "fedper"),
        ("fedrod", "fedrod"), ("ifca", "ifca"), ("moon", "moon"), ("per_fedavg", "meta"),
        ("pfedhn", "pfedhn"), ("pfedme", "pfedme"), ("reptile", "meta"),
        ("scaffold", "scaffold"))
}}
KILLED = {"killed", "timeout"}
IGNORED = {"skipped", "not checked"}


def own_tests(package: str, modules: list[str] | None = None) -> list[str]:
  """The test files a pass runs: the package's, or those of its files `modules`."""
  return PACKAGES[package] if not modules else list(dict.fromkeys(
      t for m in modules for t in MODULES[package][m]))


def mutmut_section(package: str, modules: list[str] | None = None) -> str:
  own = own_tests(package, modules)
  tests = ", ".join(f'"tests/{t}"' for t in own)
  files = ", ".join(f'"fedjax_pers/{package}/{m}.py"' for m in modules or ["*"])
  # A mutant that loops forever (a while loop's counter run backwards) is stopped after
  # 2 × 4 × its tests' time in CPU seconds; mutmut's default, 2 × 15, cost a quarter of
  # an hour a mutant on the engine's tests. It counts as killed ("timeout").
  return f"""
[tool.mutmut]
source_paths = ["fedjax_pers/"]
only_mutate = [{files}]
pytest_add_cli_args_test_selection = [{tests}]
pytest_add_cli_args = ["-q", "-m", "not run and not slow"]
also_copy = ["configs/"]
process_isolation = "forkserver"
timeout_multiplier = 4
"""


IMPORT_CHECK = """
import importlib, sys
sys.path.insert(0, "tests")
from jax._src import xla_bridge
for name in sys.argv[1:]:
  importlib.import_module(name)
  if xla_bridge._backends:
    sys.exit(f"tests/{name}.py starts JAX's backend when it is imported (a JAX array at "
             "module level?): mutmut's fork server would then hang every mutant until its "
             "timeout. Build such values in a function.")
"""


def check_imports(package: str, workdir: Path, modules: list[str] | None = None) -> None:
  """Refuses a pass whose test modules start JAX's backend when imported (see the README)."""
  names = [t.removesuffix(".py") for t in own_tests(package, modules)]
  done = subprocess.run([sys.executable, "-c", IMPORT_CHECK, *names], cwd=workdir,
                        capture_output=True, text=True)
  if done.returncode:
    sys.exit(done.stderr.strip().splitlines()[-1])


def prepare(package: str, workdir: Path, modules: list[str] | None = None) -> None:
  """A copy of the working tree (tracked and untracked, not ignored files) in `workdir`,
  with this package's mutmut section. Kept between runs: mutmut resumes its results."""
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.split()
  workdir.mkdir(parents=True, exist_ok=True)
  for f in files:
    if (ROOT / f).is_file():
      (workdir / f).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / f, workdir / f)
  toml = (ROOT / "pyproject.toml").read_text()
  toml = re.sub(r"\n\[tool\.mutmut\]\n(?:(?!\n\[).)*", "\n", toml, flags=re.S)
  section = mutmut_section(package, modules)
  (workdir / "pyproject.toml").write_text(toml.rstrip("\n") + "\n" + section)
  shared = workdir / "shared"
  if not shared.exists() and (ROOT.parent / "shared").is_dir():
    shared.symlink_to(ROOT.parent / "shared")


def equivalent() -> set[str]:
  """The mutant names `tests/MUTANTS.md` lists as equivalent."""
  path = ROOT / "tests" / "MUTANTS.md"
  if not path.exists():
    return set()
  return set(re.findall(r"^- `([\w.]+__mutmut_\d+)`", path.read_text(), flags=re.M))


def statuses(workdir: Path) -> dict[str, tuple[str, str, str]]:
  """`{mutant name: (source file, status, hash of its function's source)}` from a run's
  `mutants/**/*.py.meta`."""
  from mutmut.stats import status_by_exit_code

  out = {}
  for meta in sorted((workdir / "mutants").rglob("*.py.meta")):
    src = meta.relative_to(workdir / "mutants").as_posix()[:-len(".meta")]
    data = json.loads(meta.read_text())
    hashes = data.get("hash_by_function_name", {})
    for name, code in data["exit_code_by_key"].items():
      function = name.rsplit(".", 1)[-1].split("__mutmut_")[0]
      out[name] = (src, status_by_exit_code[code], hashes.get(function, ""))
  return out


def save(statuses_: dict[str, tuple[str, str, str]], path: Path) -> None:
  """The settled statuses (not "not checked") as JSON, compact enough to commit: per
  function its file, source hash and mutant numbers by status. A later pass on another
  machine resumes from it (`--survivors-of PATH`): the scratch directory is in /tmp."""
  out: dict = {}
  for name, (src, status, code) in sorted(statuses_.items()):
    if status in IGNORED:
      continue
    function, number = name.rsplit("__mutmut_", 1)
    entry = out.setdefault(function, {"file": src, "hash": code})
    entry.setdefault(status, []).append(int(number))
  for entry in out.values():
    for numbers in entry.values():
      if isinstance(numbers, list):
        numbers.sort()
  lines = [f"{json.dumps(f)}: {json.dumps(e)}" for f, e in sorted(out.items())]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("{\n" + ",\n".join(lines) + "\n}\n")   # a function a line


def load(path: Path) -> dict[str, tuple[str, str, str]]:
  """`save`'s file back as `{mutant name: (source file, status, hash)}`."""
  return {f"{function}__mutmut_{n}": (entry["file"], status, entry["hash"])
          for function, entry in json.loads(path.read_text()).items()
          for status, numbers in entry.items() if status not in ("file", "hash")
          for n in numbers}


def merged(workdir: Path, base: Path | None) -> dict[str, tuple[str, str, str]]:
  """This run's statuses over those of `base`, itself merged over its own base (the
  `base` its `mutation_report.json` names): a chain of survivor reruns. An earlier
  status counts only while its function's source is unchanged (the same hash in this
  run): a changed function's mutants are renumbered, and are "not checked" until rerun."""
  found = statuses(workdir)
  if base is None:
    return found
  if base.is_file():   # a `--save`d file
    before = load(base)
  else:
    saved = base / "mutation_report.json"
    earlier = json.loads(saved.read_text()).get("base") if saved.exists() else None
    before = merged(base, None if earlier is None else Path(earlier))
  kept = {k: v for k, v in before.items() if k in found and v[2] == found[k][2]}
  scope = {src for src, _, _ in found.values()}   # a `--module` run mutates some files
  others = {k: v for k, v in before.items() if v[0] not in scope}
  return {**others, **found, **kept,
          **{k: v for k, v in found.items() if v[1] not in IGNORED}}


def unsettled(workdir: Path, base: Path | None) -> list[str]:
  """The mutants of `workdir`'s tree that `base` (with its chain) did not kill and
  `tests/MUTANTS.md` does not list: the ones a rerun after new tests must check."""
  skip, here = equivalent(), statuses(workdir)
  return [name for name, (_, status, _) in sorted(merged(workdir, base).items())
          if status not in KILLED and name not in skip and name in here]


def sample(names: list[str], found: dict[str, tuple[str, str, str]], k: int,
           seed: int) -> list[str]:
  """At most `k` of `names` per source file, drawn at random with `seed`."""
  by_file: dict[str, list[str]] = {}
  for name in sorted(names):
    by_file.setdefault(found[name][0], []).append(name)
  draw = random.Random(seed)
  return sorted(n for group in by_file.values()
                for n in draw.sample(group, min(k, len(group))))


def report(workdir: Path, package: str, base: Path | None = None,
           save_to: Path | None = None) -> dict:
  """Kill rates per file and for the package; with `base`, the statuses of that earlier
  run, overridden by this run's for the mutants it checked (a rerun of survivors); with
  `save_to`, the merged statuses `save`d there."""
  found = merged(workdir, base)
  if save_to is not None:
    save(found, save_to)
  skip = equivalent()
  files, total, survivors = {}, Counter(), []
  for name, (src, status, _) in sorted(found.items()):
    status = "equivalent" if name in skip else status
    files.setdefault(src, Counter())[status] += 1
    total[status] += 1
    if status not in KILLED | IGNORED | {"equivalent"}:
      survivors.append(name)
  rate = lambda c: sum(c[k] for k in KILLED) / max(
      sum(c.values()) - sum(c[k] for k in IGNORED) - c["equivalent"], 1)
  for src, c in files.items():
    print(f"{src:48s} {rate(c):6.1%}  {dict(c)}")
  print(f"{'fedjax_pers/' + package:48s} {rate(total):6.1%}  {dict(total)}")
  # With files checked in part (a stopped pass, --sample), the package's rate over the
  # checked mutants over-weighs the files checked most: weigh each file's rate by its
  # number of mutants instead (files with none checked are left out).
  estimate = None
  if any(total[k] for k in IGNORED):
    w = {src: sum(c.values()) - c["equivalent"] for src, c in files.items()
         if sum(c.values()) > sum(c[k] for k in IGNORED) + c["equivalent"]}
    estimate = sum(rate(files[src]) * n for src, n in w.items()) / max(sum(w.values()), 1)
    print(f"{sum(total[k] for k in IGNORED)} mutants not checked; each file's rate "
          f"weighed by its number of mutants: {estimate:.1%} ({len(files) - len(w)} "
          "files with none checked left out)")
  out = {"package": package, "base": None if base is None else str(base),
         "kill_rate": rate(total), "estimate": estimate, "counts": dict(total),
         "files": {k: dict(v) for k, v in files.items()}, "survivors": survivors}
  (workdir / "mutation_report.json").write_text(json.dumps(out, indent=1))
  if survivors:
    print(f"{len(survivors)} survivors:\n  " + "\n  ".join(survivors))
  return out


def stalled(stop: threading.Event, idle_s: float = 180.0, poll_s: float = 15.0) -> None:
  """Sends SIGXCPU to a mutant's process that has used no CPU for `idle_s` seconds.

  mutmut's timeout is a CPU-time limit, so a child stuck in a deadlock (XLA's threads
  after a bad fork, a collective that waits forever) would hang the pass; SIGXCPU is
  the signal that limit sends, so mutmut records the mutant as a timeout, as it would
  a mutant that loops.
  """
  seen: dict[tuple[int, str], tuple[int, float]] = {}   # (pid, title) -> (cpu ticks, since)
  while not stop.wait(poll_s):
    for proc in Path("/proc").glob("[0-9]*"):
      try:
        title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
        ticks = sum(map(int, (proc / "stat").read_text().rsplit(")", 1)[1].split()[11:13]))
      except (OSError, ValueError, IndexError):
        continue
      if not title.startswith("mutmut: "):
        continue
      key, now = (int(proc.name), title), time.monotonic()
      last, since = seen.get(key, (-1, now))
      if ticks != last:
        seen[key] = (ticks, now)
      elif now - since > idle_s:
        print(f"{title[8:].strip()}: no CPU for {now - since:.0f} s; SIGXCPU", flush=True)
        os.kill(key[0], signal.SIGXCPU)
        seen[key] = (ticks, now)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("package", choices=sorted(PACKAGES))
  p.add_argument("names", nargs="*", help="mutant name globs to (re)run; default all")
  p.add_argument("--module", action="append", default=None,
                 help="a file of the package (" + "; ".join(
                     f"{k}: {', '.join(v)}" for k, v in MODULES.items()) + "), against its "
                      "own tests; repeat for several. Saved statuses of the other files "
                      "are kept")
  p.add_argument("--max-children", type=int, default=2)
  p.add_argument("--workdir", default=None)
  p.add_argument("--survivors-of", default=None,
                 help="an earlier run's workdir, or a file it --save'd: run, here, every "
                      "mutant it did not kill, and report its statuses with theirs replaced")
  p.add_argument("--save", default=None,
                 help="write the merged statuses to this JSON file (commit it: a later pass "
                      "on another machine resumes from it with --survivors-of)")
  p.add_argument("--sample", type=int, default=None, metavar="K",
                 help="check only K mutants of each file among those no pass has checked, "
                      "drawn at random (--seed): an estimate of each file's rate in a "
                      "fraction of the time; the others stay not checked")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--report-only", action="store_true")
  args = p.parse_intermixed_args()   # names may follow the options
  if args.sample is not None and args.sample < 1:
    p.error(f"--sample must be a positive number of mutants per file; got {args.sample}")
  for m in args.module or []:
    if m not in MODULES.get(args.package, {}):
      p.error(f"--module must be one of {sorted(MODULES.get(args.package, {}))} for "
              f"{args.package}; got {m!r}")
  workdir = Path(args.workdir or f"/tmp/fedjax_pers_mutation/{args.package}"
                 + "+".join(args.module or []))
  base = None if args.survivors_of is None else Path(args.survivors_of)
  names = list(args.names)
  if not args.report_only:
    prepare(args.package, workdir, args.module)
    check_imports(args.package, workdir, args.module)
    mutmut = shutil.which("mutmut", path=os.path.dirname(sys.executable)) or "mutmut"
    run = [mutmut, "run", "--max-children", str(args.max_children)]
    batches = [names]
    if base is not None or args.sample:
      # Generates the mutants and runs the stats, then stops: no mutant has this name.
      subprocess.run([*run, "no_such_mutant"], cwd=workdir, check=False)
      rerun = unsettled(workdir, base)
      # Mutants no pass has checked run first: a survivor runs every test that reaches
      # it, so the reruns are the slow part, and a stopped pass has checked the new ones.
      now = merged(workdir, base)
      fresh = [n for n in rerun if now[n][1] in IGNORED]
      if args.sample:
        fresh = sample(fresh, now, args.sample, args.seed)
      batches = [names + fresh, [n for n in rerun if now[n][1] not in IGNORED]]
      print(f"{sum(map(len, batches))} mutants to run: {len(batches[0])} not checked "
            f"before, then {len(batches[1])} reruns")
    stop = threading.Event()
    threading.Thread(target=stalled, args=(stop,), daemon=True).start()
    try:
      for batch in batches:
        if batch or base is None:
          subprocess.run([*run, *batch], cwd=workdir, check=True)
    finally:
      stop.set()
  report(workdir, args.package, base, None if args.save is None else Path(args.save))


if __name__ == "__main__":
  main()
