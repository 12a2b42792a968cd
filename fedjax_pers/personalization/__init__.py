"""Personalization: per-client models and the evaluation protocol that measures them."""

from fedjax_pers.personalization._finetune import (
    PersonalizedEval,
    evaluate_personal,
    finetune,
    personalize,
    summarize_personalization,
)
from fedjax_pers.personalization._meta import (
    MetaGradient,
    MetaSGDParams,
    adapt,
    batch_loss,
    hvp,
    meta_gradient,
    meta_sgd_model,
    meta_sgd_tx,
)

__all__ = [
    "MetaGradient",
    "MetaSGDParams",
    "PersonalizedEval",
    "adapt",
    "batch_loss",
    "evaluate_personal",
    "finetune",
    "hvp",
    "meta_gradient",
    "meta_sgd_model",
    "meta_sgd_tx",
    "personalize",
    "summarize_personalization",
]
