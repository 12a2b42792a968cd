"""Command line: `python -m fedjax_pers.compare --config=configs/X.py --workdir=DIR`.

Runs every strategy of `config.compare.strategies` on the same data, clients
and seeds, and writes `comparison.json`, `comparison.md` and `comparison.png`
(see `fedjax_pers.experiment.compare`).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_pers._cli import guarded

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Comparison config file (get_config() with a `compare` block).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default ./workdir/<config>).")


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None or "compare" not in config:
    raise app.UsageError("--config must name a config with a `compare` block "
                         "(for instance configs/compare_weighting.py).")
  from fedjax_pers.distributed import cpu_devices  # before JAX starts its backend

  cpu_devices(config.execution.get("num_devices"))
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax

  jax.config.config_with_absl()
  from fedjax_pers.experiment import compare, comparison_table

  workdir = _WORKDIR.value or os.path.join(
      "workdir", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  out = compare(config, workdir)
  print(comparison_table(out))
  print(f"Wrote comparison.json, comparison.md and comparison.png to {workdir}")


def main(argv):
  guarded(_main, argv)


if __name__ == "__main__":
  app.run(main)
