"""The experiment driver: run loop, evaluation, metrics, checkpoints, plots."""

from fedjax_pers.experiment._algorithms import make_algorithm
from fedjax_pers.experiment._compare import compare, comparison_table, parse_strategy
from fedjax_pers.experiment._outputs import read_jsonl, summary_table
from fedjax_pers.experiment._registry import (
    make_data,
    make_local_work,
    make_model,
    make_optimizer,
    prepare_data,
)
from fedjax_pers.experiment._train import train_and_evaluate

__all__ = [
    "compare",
    "comparison_table",
    "parse_strategy",
    "prepare_data",
    "make_algorithm",
    "make_data",
    "make_local_work",
    "make_model",
    "make_optimizer",
    "read_jsonl",
    "summary_table",
    "train_and_evaluate",
]
