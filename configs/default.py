"""The default experiment (what `python -m fedjax_pers` runs with no --config)."""

from fedjax_pers.experiment.default_config import get_config

__all__ = ["get_config"]
