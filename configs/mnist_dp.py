"""Client-level DP-FedAvg (McMahan et al., ICLR 2018) on real MNIST over 100 clients.

`mnist_dirichlet`'s data, a logistic regression (IID here: `--config.data.partition=dirichlet`
for label skew); 20 clients per round, uniform weights over the fixed
denominator W = 20; each update clipped to C = 1 and the sum noised with
N(0, (zC)²), z calibrated so that ε after `num_rounds` rounds is
`privacy.target_epsilon` at δ = 1e-3 (RDP; fixed-size sampling, q = 0.2).
`--config.privacy.noise_multiplier=Z --config.privacy.target_epsilon=None`
fixes z instead; `--config.privacy.clip_norm=None` turns DP off.
"""

from configs import mnist_dirichlet


def get_config():
  c = mnist_dirichlet.get_config()
  c.num_rounds = 50
  c.eval_every = 5
  c.clients_per_round = 20
  c.data.partition = "iid"
  c.model.name = "logistic_regression"   # 7,850 parameters: less noise in all than the MLP
  c.aggregation.weighting = "uniform"
  c.client.local_epochs = 1
  c.server.learning_rate = 1.0
  c.privacy.clip_norm = 1.0
  c.privacy.target_epsilon = 8.0
  c.privacy.delta = 1e-3
  return c
