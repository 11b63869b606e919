"""v4jax: the DeepSeek-V3 / V3.2 / V4 model family in JAX/Flax, for research.

Public API:
    ModelConfig, YarnScaling          the model configuration (`ModelConfig.from_hf` reads HF configs)
    presets.get(name)                 tiny / tiny_v4 / small / small_v4 / the published full-scale configs
    param_counts(cfg)                 (total, active) parameter counts from abstract shapes
    model.init_params / model.forward parameters and float32 logits
    hf.load_checkpoint / hf.save_checkpoint   HF safetensors checkpoints (FP8 dequantised on load)
    sharding                          meshes and logical-axis rule presets
    data                              corpus, tokenizer and deterministic per-host batches
    train                             TrainConfig and the sharded Trainer step
    checkpointing                     orbax training checkpoints (atomic, resumable)
"""

from v4jax import checkpointing, data, hf, model, presets, sharding, train
from v4jax.config import ModelConfig, YarnScaling
from v4jax.params import param_counts

__all__ = [
    "ModelConfig",
    "YarnScaling",
    "checkpointing",
    "data",
    "hf",
    "model",
    "param_counts",
    "presets",
    "sharding",
    "train",
]
