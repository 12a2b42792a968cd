"""Small flax models: logistic regression, MLP, CNN."""

from fedjax_pers.models._models import cnn, logistic_regression, mlp

__all__ = ["cnn", "logistic_regression", "mlp"]
