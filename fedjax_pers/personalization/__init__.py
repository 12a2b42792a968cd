"""Personalization: per-client models and the evaluation protocol that measures them."""

from fedjax_pers.personalization._finetune import (
    PersonalizedEval,
    evaluate_personal,
    finetune,
    personalize,
    summarize_personalization,
)

__all__ = [
    "PersonalizedEval",
    "evaluate_personal",
    "finetune",
    "personalize",
    "summarize_personalization",
]
