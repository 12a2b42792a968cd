"""pFedMe (Dinh et al., NeurIPS 2020) in its paper's synthetic setting.

Synthetic(0.5, 0.5), 100 clients, sample scale 5, seed 0, logistic regression;
batch 20, R = 20 local rounds of K = 5 inner steps, η = 0.005, η_p = 0.01, λ = 20,
β = 1; all clients train every round and 10 are averaged; 600 rounds. Each
client is evaluated with its personalized θ_k.
"""

from configs.synthetic_finetune import get_config as _finetune


def get_config():
  c = _finetune()
  c.algorithm = "pfedme"
  c.aggregation.weighting = "uniform"     # the paper's server mean over the cohort
  c.personalization.finetune_steps = 0
  c.pfedme.personal_learning_rate = 0.01
  c.pfedme.lam = 20.0
  c.pfedme.inner_steps = 5
  c.pfedme.beta = 1.0
  return c
