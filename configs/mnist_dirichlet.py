"""FedAvg with an MLP on real MNIST images, Dirichlet(0.1) label skew over 100 clients.

The 10,000 MNIST test images in `data.data_dir` (`../shared/data/mnist`, the
offline stand-in for the MNIST benchmark; or your own IDX files) are dealt to
100 clients with Dirichlet(0.1) label proportions (each client keeps 20% of its
images as its test split); a 784-200-10 MLP; 10 clients per round, 5 local
epochs of batch 10 at lr 0.05, 100 rounds. `--config.data.partition=iid` deals
them IID instead; `shards` (`data.shards_per_client`) and `quantity_skew`
(`data.quantity_sigma`) are the other partitions. For the full 60,000 training
images use `data.images=train-images-idx3-ubyte.gz`, `data.labels=
train-labels-idx1-ubyte.gz`, or a prepared TFDS set: `data.name=tfds`,
`data.tfds_name=mnist`.
"""

from ml_collections.config_dict import placeholder

from fedjax_pers.experiment.default_config import base_config


def get_config():
  c = base_config()
  c.num_rounds = 100
  c.eval_every = 10
  c.eval_train = False
  c.data.name = "mnist_idx"
  c.data.data_dir = "../shared/data/mnist"
  c.data.images = "t10k-images-idx3-ubyte.gz"
  c.data.labels = "t10k-labels-idx1-ubyte.gz"
  c.data.num_clients = 100
  c.data.partition = "dirichlet"     # iid | dirichlet | shards | quantity_skew
  c.data.dirichlet_alpha = 0.1
  c.data.shards_per_client = 2
  c.data.quantity_sigma = 1.0
  c.data.min_client_examples = 8    # Dirichlet(0.1) over 100 clients: 10 is not drawable
  c.data.test_fraction = 0.2
  c.data.tfds_name = "mnist"         # with data.name = "tfds"
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = placeholder(str)   # None: TFDS's default
  c.model.name = "mlp"
  c.model.hidden = (200,)
  c.client.learning_rate = 0.05
  c.client.batch_size = 10
  c.client.local_epochs = 5
  return c
