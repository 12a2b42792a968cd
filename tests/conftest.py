"""Test set-up before JAX starts: four fake CPU devices, strict rank promotion, quick
compiles and a cache of compiled programs."""

import os

# Tests compile hundreds of small programs and run each briefly: LLVM's optimizations
# cost more compile time than they save (a tiny round: 5 s to compile, 0.05 s to run).
# Benchmarks and users keep XLA's defaults.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Many tests compile the same round (the same config, model and shapes). One cache of
# compiled programs for the session's workers: a program compiled once is loaded after.
if os.environ.get("FEDJAX_PERS_TEST_CACHE", "1") != "0":
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "FEDJAX_PERS_TEST_CACHE_DIR",
      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   ".pytest_cache", "jax_compilation_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def subprocess_env(**extra: str) -> dict[str, str]:
  """The environment for a test's `python -m fedjax_pers` subprocess: XLA's quick compiles
  and this session's cache of compiled programs, but the device count left to the command
  (the CLI's default is one CPU device per core; `JAX_NUM_CPU_DEVICES` in `extra` sets it)."""
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", **extra)
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return env


def pytest_collection_modifyitems(items):
  """Long items first (notebooks, `slow` and `run` items: 10 s to two minutes each), the
  rest in their order: `pytest -n 2` then deals them out at the start, and the workers
  end on short tests together instead of one waiting for the other's last long run."""
  def long(item):
    return item.path.suffix == ".ipynb" or any(
        item.get_closest_marker(name) is not None for name in ("slow", "run"))
  items.sort(key=lambda item: not long(item))
