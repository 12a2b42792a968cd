"""Small flax models: logistic regression, MLP, CNN, character RNN."""

from fedjax_pers.models._char import char_rnn
from fedjax_pers.models._models import cnn, logistic_regression, mlp

__all__ = ["char_rnn", "cnn", "logistic_regression", "mlp"]
