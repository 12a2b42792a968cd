"""Every file in configs/ loads, and every compare strategy names real config keys."""

import importlib
import os

import pytest

from fedjax_pers.experiment._algorithms import ADAPTING
from fedjax_pers.experiment._compare import apply_overrides, parse_strategy
from fedjax_pers.experiment._weighting import weighting_name, weighting_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
               if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_and_its_strategies_apply(name):
  c = importlib.import_module(f"configs.{name}").get_config()
  variants = [c]
  if "compare" in c:
    variants = [apply_overrides(c, parse_strategy(s)[1]) for s in c.compare.strategies]
  for v in variants:
    assert v.num_rounds >= 1 and v.clients_per_round >= 1
    names = weighting_table(v, None, None, None)   # lazy: builds nothing
    assert set(weighting_name(v).split("*")) <= set(names), name
    if v.algorithm in ADAPTING:
      assert v.personalization.finetune_steps > 0, name
    if v.algorithm in ("ditto", "apfl", "pfedme", "fedper", "fedrep", "lg_fedavg", "fedbn",
                       "fedrod", "fedala"):   # they test their own models; newcomers fine-tune
      assert not v.personalization.finetune_steps or v.data.holdout_clients > 0, name
