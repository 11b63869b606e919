"""Training: `TrainConfig`, the jitted sharded `Trainer` step, the losses, aux-loss-free balancing and the
optimizers. See `v4jax.train.step` for the state layout and `experiments/train.py` for a full run."""

from v4jax.train.balancing import max_violation, update_router_biases
from v4jax.train.config import TrainConfig
from v4jax.train.losses import cross_entropy, loss_terms, mtp_loss
from v4jax.train.optimizer import learning_rate_schedule, make_optimizer, param_groups
from v4jax.train.step import Trainer

__all__ = [
    "TrainConfig",
    "Trainer",
    "cross_entropy",
    "learning_rate_schedule",
    "loss_terms",
    "make_optimizer",
    "max_violation",
    "mtp_loss",
    "param_groups",
    "update_router_biases",
]
