"""`TrainConfig`: the optimisation and loss settings of a run (the model's are in `ModelConfig`).

Defaults follow the DeepSeek-V3 report where it gives them: AdamW β = (0.9, 0.95), weight decay 0.1,
gradient clipping 1.0, MTP weight λ = 0.3, balance-loss α = 1e-4 and bias update speed γ = 1e-3.
Mixed precision is a model setting: `ModelConfig(dtype='bfloat16', param_dtype='float32')` computes in
bf16 and keeps float32 master parameters (and optimizer state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimizer, schedule and loss weights. Validated on construction; every error names the field."""

    optimizer: str = "adamw"  # 'adamw', or 'muon' for matrices with AdamW for the rest (V4 recipe)
    learning_rate: float = 3e-4  # peak
    schedule: str = "cosine"  # warmup then 'cosine' | 'wsd' (warmup-stable-decay) | 'constant'
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1  # final learning rate / peak (cosine, wsd)
    decay_fraction: float = 0.2  # wsd: the last fraction of total_steps decays linearly
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices and embeddings only
    clip_norm: float | None = 1.0  # global gradient-norm clip; None: off
    muon_momentum: float = 0.95
    muon_rms: float = 0.2  # Muon updates rescaled to this RMS so AdamW's learning rate fits (Moonlight)
    mtp_weight: float = 0.3  # λ: loss = CE + λ · mean_k MTP_k
    balance_alpha: float = 1e-4  # α: sequence-wise balance loss weight (0 disables it)
    bias_update_speed: float = 1e-3  # γ: aux-loss-free router bias step (0 disables it)
    indexer_kl_weight: float = 1.0  # weight of the indexer KL (only with ModelConfig.indexer_training)

    def __post_init__(self):
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"TrainConfig needs total_steps ≥ 1 and 0 ≤ warmup_steps ≤ total_steps, got "
                f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}"
            )
        for name in ("min_lr_ratio", "decay_fraction", "b1", "b2", "muon_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("eps", "weight_decay", "mtp_weight", "balance_alpha", "bias_update_speed", "indexer_kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"TrainConfig.clip_norm must be > 0 or None, got {self.clip_norm}")
        if not self.muon_rms > 0:
            raise ValueError(f"TrainConfig.muon_rms must be > 0, got {self.muon_rms}")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
