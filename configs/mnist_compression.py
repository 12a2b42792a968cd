"""Compressed updates on real MNIST: `mnist_dirichlet`'s data dealt IID to 100 clients,
the 784-200-10 MLP (159,010 parameters), 20 clients per round, 1 local epoch, 50 rounds,
uniform weights; each update quantised to 4 bits per coordinate after a random Hadamard
rotation (Suresh et al., ICML 2017). `--config.compression.method=top_k
--config.compression.fraction=0.01` sends the 1% largest coordinates with error feedback
instead; `--config.compression.method=None` sends 32-bit floats.
`benchmarks/compression_mnist.py` runs them all (the README's table).
"""

from configs import mnist_dirichlet


def get_config():
  c = mnist_dirichlet.get_config()
  c.num_rounds = 50
  c.eval_every = 5
  c.clients_per_round = 20
  c.data.partition = "iid"
  c.aggregation.weighting = "uniform"
  c.client.local_epochs = 1
  c.compression.method = "quantize"
  c.compression.bits = 4
  c.compression.rotate = True
  return c
