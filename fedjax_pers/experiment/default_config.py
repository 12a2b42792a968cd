"""The default experiment, and the keys every experiment config shares.

`python -m fedjax_pers` with no `--config` runs `get_config()` from this file: FedAvg
on Synthetic(1, 1) (generated, no download). Files in `configs/` start from
`base_config()` and change what their experiment needs.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
  """The keys shared by every experiment config, with FedAvg defaults."""
  c = ml_collections.ConfigDict()
  c.algorithm = "fedavg"          # fedavg | fedprox | finetune | ditto |
                                  # fedper | lg_fedavg | fedrep | apfl | pfedme |
                                  # per_fedavg | per_fedavg_fo | per_fedavg_hf | reptile
  c.num_rounds = 100
  c.clients_per_round = 10
  c.sampling = "uniform"          # uniform | num_examples (p ∝ n_i, without replacement)
  c.eval_every = 5
  c.eval_train = True             # also evaluate the global model on the train splits
  c.tensorboard = True              # event files in WORKDIR/tensorboard (tensorboardX)
  c.eval_clients = placeholder(int)   # host store: evaluate a seeded sample of this many
                                      # clients (None: every client, streamed)
  c.seed = 0
  c.checkpoint_every = 0          # 0: only at the end
  c.progress = True

  # How clients execute (fedjax_pers.Execution); never changes what a round computes.
  c.execution = ml_collections.ConfigDict()
  c.execution.strategy = "auto"             # auto | vmap | chunked | scan | lanes
  c.execution.client_chunk = placeholder(int)   # chunked
  c.execution.lanes = placeholder(int)      # lanes per device (None: from the clients' steps)
  c.execution.num_devices = placeholder(int)    # shard cohorts over this many devices; None:
                                            # every device (on CPU, the CLI makes one per core)

  # Vectorised sweeps (fedjax_pers.sweep): S variants of this run as one compiled program,
  # the round vmapped over stacked server states. seeds: config.seed, seed + 1, ...;
  # grid: "key=v1,v2,...; key2=..." float keys that do not change shapes, crossed.
  # (Not "values": ml_collections reads that flag as the dict method.)
  c.sweep = ml_collections.ConfigDict()
  c.sweep.seeds = 1
  c.sweep.grid = ""
  c.sweep.chunk = placeholder(int)          # variants per program (None: as many as fit)

  # Several processes (jax.distributed): all three, or none (one process). auto=True
  # lets JAX detect a cluster (SLURM, Open MPI, TPU pods) instead.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = placeholder(str)   # e.g. "10.0.0.1:1234"
  c.distributed.num_processes = placeholder(int)
  c.distributed.process_id = placeholder(int)
  c.distributed.auto = False

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"
  c.data.alpha = 1.0
  c.data.beta = 1.0
  c.data.num_clients = 30
  c.data.dim = 60
  c.data.num_classes = 10
  c.data.sample_scale = 1
  c.data.iid = False
  c.data.clusters = 2             # clustered_synthetic: the number of label generators
  c.data.seed = 0
  c.data.test_fraction = 0.1
  c.data.proxy_examples = placeholder(int)   # hold this many test examples out for the
                                  # server's proxy set (fedlaw, auto); evaluation uses the
                                  # rest. None: 100 for a weighting that learns on it, else 0
  c.data.holdout_clients = 0.0    # > 0: this share of the clients never trains; the
                                  # summary's unseen_* keys report them
  c.data.store = placeholder(str)   # a directory: the clients live there as host stores
                                    # (train/, test/), written from data.* on the first
                                    # run; data.name='store' runs from one as it is
  c.data.example_cap = placeholder(int)   # train clients larger than this train on a fresh
                                          # random subset of this many examples each round
                                          # (weights keep the true n_i); None: no cap

  c.model = ml_collections.ConfigDict()
  c.model.name = "logistic_regression"   # logistic_regression | mlp | cnn | char_rnn
  c.model.hidden = (200, 200)

  c.client = ml_collections.ConfigDict()
  c.client.optimizer = "sgd"
  c.client.learning_rate = 0.01
  c.client.momentum = 0.0
  c.client.batch_size = 10
  c.client.local_epochs = placeholder(int)
  c.client.local_steps = placeholder(int)

  c.server = ml_collections.ConfigDict()
  c.server.optimizer = "sgd"      # sgd (FedAvg) | momentum (FedAvgM) | adam | yogi | adagrad
  c.server.learning_rate = 1.0
  c.server.momentum = 0.0

  c.aggregation = ml_collections.ConfigDict()
  # default: the algorithm paper's own (uniform for per_fedavg*, reptile and pfedme,
  # num_examples for the others).
  # Weighted means: num_examples | uniform | loss | loss_improvement | cosine | fedadp |
  # label_divergence | label_entropy, or several joined by '*' (product, renormalised).
  # Aggregators: q_ffl | fedlaw | auto | median | trimmed_mean | krum | multi_krum |
  # clip_norm. auto and fedlaw learn on the proxy set (data.proxy_examples).
  c.aggregation.weighting = "default"
  c.aggregation.temperature = 1.0     # loss, loss_improvement, label_divergence, label_entropy
  c.aggregation.power = 1.0           # w ∝ w^power (weight functions only)
  c.aggregation.floor = 0.0           # w ← (1 − floor) w + floor / m
  c.aggregation.population = "cohort"  # label_divergence's reference: cohort | data
  c.aggregation.fedadp_alpha = 5.0
  c.aggregation.q = 1.0               # q_ffl
  c.aggregation.trim_beta = 0.1       # trimmed_mean
  c.aggregation.byzantine_f = 1       # krum, multi_krum
  c.aggregation.multi_krum_m = placeholder(int)
  c.aggregation.max_norm = 1.0        # clip_norm
  c.aggregation.fedlaw_steps = 100       # fedlaw, and auto's FedLAW family
  c.aggregation.fedlaw_learning_rate = 0.05
  c.aggregation.auto_steps = 1         # auto: Adam steps on the mixture per round
  c.aggregation.auto_learning_rate = 0.2

  c.personalization = ml_collections.ConfigDict()
  c.personalization.finetune_steps = 0   # > 0: at every evaluation each client fine-tunes
                                         # the global model (train split) and is tested
  c.personalization.optimizer = "sgd"
  c.personalization.learning_rate = 0.01
  c.personalization.momentum = 0.0
  c.personalization.batch_size = 10

  # Client-level DP-FedAvg (fedjax_pers.privacy): clip_norm set turns it on.
  c.privacy = ml_collections.ConfigDict()
  c.privacy.clip_norm = placeholder(float)         # C: each client's update clipped to it
  c.privacy.noise_multiplier = placeholder(float)  # z: noise N(0, (zC)²) on the sum; or
  c.privacy.target_epsilon = placeholder(float)    # ε after num_rounds: z calibrated to it
  c.privacy.delta = placeholder(float)             # δ (None: 1 / N^1.1)
  c.privacy.accountant = "rdp"                     # rdp, or pld (poisson sampling only)
  c.privacy.sampling = "fixed"                     # fixed: k of N; poisson: each at q = k/N
  c.privacy.local = False                          # True: each client noises its own update
  c.privacy.example_cap = placeholder(int)         # num_examples weighting: min(n_i/cap, 1)
  c.privacy.target_quantile = placeholder(float)   # γ: adaptive C (Andrew et al. 2021)
  c.privacy.clip_learning_rate = 0.2               # η_C of C's geometric update
  c.privacy.clipped_count_stddev = placeholder(float)  # σ_b (None: max(k / 20, z))

  # Compressed updates (fedjax_pers.privacy.compressed): method set turns it on.
  c.compression = ml_collections.ConfigDict()
  c.compression.method = placeholder(str)   # quantize (2^bits levels) or top_k
  c.compression.bits = 8                    # quantize: bits per coordinate, 1 to 16
  c.compression.rotate = False              # quantize: random Hadamard rotation first
  c.compression.fraction = 0.01             # top_k: fraction of coordinates sent
  c.compression.error_feedback = True       # top_k: clients keep what they did not send

  # Secure aggregation, simulated (Bonawitz et al. 2017): bits set turns it on; it
  # clips to privacy.clip_norm (noise_multiplier=0: no noise) and sums in b-bit fixed point.
  c.secure_aggregation = ml_collections.ConfigDict()
  c.secure_aggregation.bits = placeholder(int)   # b in [8, 32]
  c.secure_aggregation.dropout_rate = 0.0        # sampled clients that drop after masking

  # System heterogeneity (FedProx's experiments): stragglers and dropouts in each cohort.
  c.system = ml_collections.ConfigDict()
  c.system.straggler_fraction = 0.0      # of each cohort: a random number of epochs in [1, E]
  c.system.dropout_rate = 0.0            # sampled clients that never report
  c.system.drop_stragglers = placeholder(bool)   # None: True for fedavg, else False

  c.corruption = ml_collections.ConfigDict()
  c.corruption.label_shuffle_fraction = 0.0   # clients whose train labels are shuffled
  c.corruption.attack_fraction = 0.0          # clients that send attack_scale × update
  c.corruption.attack_scale = -10.0
  c.corruption.seed = 0

  c.fedala = ml_collections.ConfigDict()   # FedALA's adaptive local aggregation
  c.fedala.eta = 1.0              # η, the mixing weights' learning rate (0: FedAvg)
  c.fedala.sample_fraction = 0.8  # s, the share of local data ALA reads
  c.fedala.threshold = 0.1        # start phase: stop when the last losses' std is below
  c.fedala.num_pre_loss = 10      # ... over this many epochs
  c.fedala.max_start_epochs = 100

  c.ifca = ml_collections.ConfigDict()
  c.ifca.num_clusters = 2         # k cluster models

  c.pfedhn = ml_collections.ConfigDict()   # the server's hypernetwork (paper's defaults)
  c.pfedhn.outer_lr = 0.01        # α, the hypernetwork's SGD rate
  c.pfedhn.outer_momentum = 0.9
  c.pfedhn.embed_lr = placeholder(float)   # the embeddings' rate (None: outer_lr)
  c.pfedhn.embed_dim = placeholder(int)    # e (None: 1 + num_clients / 4)
  c.pfedhn.hidden = 100
  c.pfedhn.num_hidden = 3
  c.pfedhn.adapt_steps = 50       # a newcomer fits its embedding: steps of gradient descent
  c.pfedhn.adapt_lr = 0.1         # ... at this rate, the hypernetwork frozen

  c.moon = ml_collections.ConfigDict()
  c.moon.mu = 1.0                 # MOON's μ (1 or 5 in the paper)
  c.moon.temperature = 0.5        # τ of the model-contrastive loss

  c.fedbuff = ml_collections.ConfigDict()
  c.fedbuff.buffer_size = placeholder(int)   # K (None: clients_per_round)
  c.fedbuff.concurrency = placeholder(int)   # M (None: 2K, at most N)
  c.fedbuff.staleness_exponent = 0.5         # reports weighted by (1 + s)^(-a)
  c.fedbuff.latency_spread = 1.0             # σ of the clients' lognormal durations

  c.feddyn = ml_collections.ConfigDict()
  c.feddyn.alpha = 0.01           # FedDyn's α (the paper tries 0.1, 0.01, 0.001)

  c.ditto = ml_collections.ConfigDict()
  c.ditto.lam = 0.1               # Ditto's λ (personal steps as client.*)

  c.pfedme = ml_collections.ConfigDict()   # η = client.learning_rate, R = client.local_steps
  c.pfedme.personal_learning_rate = 0.01  # η_p
  c.pfedme.lam = 20.0
  c.pfedme.inner_steps = 5                # K
  c.pfedme.beta = 1.0
  c.pfedme.local_rounds = placeholder(int)  # R; default client.local_steps

  c.apfl = ml_collections.ConfigDict()
  c.apfl.alpha = 0.25             # APFL's mixture α v + (1 − α) w (the start, if learned)
  c.apfl.alpha_lr = placeholder(float)  # > 0: learn each client's α (adaptive APFL)

  c.fedrep = ml_collections.ConfigDict()
  c.fedrep.head_steps = 10        # FedRep's head phase (body frozen); the body phase is
                                  # client.local_epochs / local_steps with the head frozen

  c.fedprox = ml_collections.ConfigDict()
  c.fedprox.mu = 0.0

  # per_fedavg | per_fedavg_fo | per_fedavg_hf: the outer step β is client.*, the server
  # averages; evaluation adapts with personalization.finetune_steps steps of SGD
  # (personalization.learning_rate, usually α).
  c.per_fedavg = ml_collections.ConfigDict()
  c.per_fedavg.inner_lr = 0.005           # α
  c.per_fedavg.inner_steps = 1            # K adaptation steps inside the meta-objective
  c.per_fedavg.hessian = "exact"          # per_fedavg: exact (jvp HVP) | autodiff
                                          # (grad through the inner steps)
  c.per_fedavg.delta = 1e-3               # the finite difference's δ
  c.per_fedavg.meta_sgd = False           # learn one α per parameter (Meta-SGD)
  c.per_fedavg.remat = False              # jax.checkpoint the inner steps

  c.reptile = ml_collections.ConfigDict()
  c.reptile.outer_lr = 1.0                # ε; clients run client.* steps from φ
  return c


def get_config() -> ml_collections.ConfigDict:
  """FedAvg on Synthetic(1, 1): 30 clients, 10 per round, 20 epochs of batch 10, 60 rounds."""
  c = base_config()
  c.num_rounds = 60
  c.client.local_epochs = 20
  return c
