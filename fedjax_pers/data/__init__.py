"""Data sets as `FederatedData`: synthetic generators, files, TFDS, partitioners, corruptions."""

from fedjax_pers.data._client_states import HostClientStates
from fedjax_pers.data._clustered import cluster_groups, cluster_recovery, clustered_synthetic
from fedjax_pers.data._corrupt import (
    choose_clients,
    holdout,
    holdout_clients,
    shuffle_labels,
    subset_clients,
)
from fedjax_pers.data._feed import CohortFeed, check_model, evaluate_store
from fedjax_pers.data._files import from_leaf, mnist_idx, read_idx, read_leaf, write_leaf
from fedjax_pers.data._partition import (
    dirichlet,
    from_arrays,
    iid,
    natural,
    partition,
    quantity_skew,
    shards,
    split_clients,
)
from fedjax_pers.data._shakespeare import (
    OOV_ID,
    VOCAB,
    VOCAB_SIZE,
    shakespeare,
    shakespeare_from_text,
)
from fedjax_pers.data._sink import federate, open_split_store, store_exists
from fedjax_pers.data._store import HostStore, StoreWriter, open_store, save_store
from fedjax_pers.data._synthetic import synthetic, synthetic_arrays
from fedjax_pers.data._tfds import from_tfds, prepared_builder, tfds_examples, tfds_image_arrays

__all__ = [
    "CohortFeed",
    "HostClientStates",
    "HostStore",
    "StoreWriter",
    "check_model",
    "evaluate_store",
    "federate",
    "open_split_store",
    "store_exists",
    "open_store",
    "save_store",
    "OOV_ID",
    "VOCAB",
    "VOCAB_SIZE",
    "choose_clients",
    "cluster_groups",
    "cluster_recovery",
    "clustered_synthetic",
    "dirichlet",
    "from_arrays",
    "from_leaf",
    "from_tfds",
    "holdout",
    "holdout_clients",
    "iid",
    "mnist_idx",
    "natural",
    "partition",
    "prepared_builder",
    "quantity_skew",
    "read_idx",
    "read_leaf",
    "shakespeare",
    "shakespeare_from_text",
    "shards",
    "shuffle_labels",
    "subset_clients",
    "split_clients",
    "synthetic",
    "synthetic_arrays",
    "tfds_examples",
    "tfds_image_arrays",
    "write_leaf",
]
