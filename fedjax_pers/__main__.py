"""Command line: `python -m fedjax_pers --config=configs/NAME.py --workdir=DIR`.

With no flags, runs the default config (an embedded Synthetic(1, 1) experiment
that needs no download) into `./workdir/default`.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_pers._cli import guarded

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "experiment", "default_config.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default ./workdir/<config>).")


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  from fedjax_pers.distributed import cpu_devices, initialize  # before JAX starts a backend

  cpu_devices(config.execution.get("num_devices"))
  d = config.distributed
  initialize(d.coordinator_address, d.num_processes, d.process_id, auto=d.auto)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # keep orbax's INFO lines off the console
  import jax

  jax.config.config_with_absl()
  from fedjax_pers.experiment import summary_table, train_and_evaluate

  workdir = _WORKDIR.value
  if workdir is None:
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = os.path.join("workdir", name)
  summary = train_and_evaluate(config, workdir)
  if jax.process_index() != 0:   # process 0 reports for a run over several processes
    return
  if "sweep" in summary:   # mean ± std [95% interval] over seeds, per group of values
    from fedjax_pers.experiment._sweep import table

    print(table(summary))
    print(f"Wrote each variant's run to {workdir}/variants/, and summary.json, curves.png "
          f"(bands over seeds) and checkpoints to {workdir}")
    return
  print(summary_table(summary))
  print(f"Wrote metrics.jsonl, summary.json, curves.png and checkpoints to {workdir}")


def main(argv):
  guarded(_main, argv)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
