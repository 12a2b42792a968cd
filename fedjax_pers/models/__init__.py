"""Small flax models: logistic regression, MLP, CNN (with or without batch norm), character
RNN."""

from fedjax_pers.models._char import char_rnn
from fedjax_pers.models._models import cnn, cnn_bn, logistic_regression, mlp

__all__ = ["char_rnn", "cnn", "cnn_bn", "logistic_regression", "mlp"]
