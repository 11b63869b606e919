"""Dense SwiGLU feed-forward (the dense prefix layers and the MoE shared experts).

h = silu(x·W1) ⊙ (x·W3):  'BTD,DF->BTF' twice
y = h·W2:                 'BTF,FD->BTD'

With `cfg.swiglu_limit` L (V4) the pre-activations are clamped before the product: x·W1 ≤ L and
x·W3 ∈ [−L, L] (`linear.swiglu`). HF's V4 shared expert (`DeepseekV4MLP`) clamps, as does the official code.
"""

from __future__ import annotations

import chex
import jax
from flax import linen as nn

from v4jax import sharding as shd
from v4jax.config import ModelConfig
from v4jax.layers.linear import Projection, swiglu


class MLP(nn.Module):
    """SwiGLU MLP of hidden width `hidden` (names w1 = gate, w3 = up, w2 = down as in the reference)."""

    cfg: ModelConfig
    hidden: int
    hidden_axis: str = shd.MLP

    def setup(self):
        d, f = self.cfg.hidden_size, self.hidden
        self.w1 = Projection(self.cfg, (d, f), (shd.EMBED, self.hidden_axis))
        self.w3 = Projection(self.cfg, (d, f), (shd.EMBED, self.hidden_axis))
        self.w2 = Projection(self.cfg, (f, d), (self.hidden_axis, shd.EMBED))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        chex.assert_axis_dimension(x, -1, self.cfg.hidden_size)
        act_hidden = shd.ACT_MLP if self.hidden_axis == shd.MLP else None
        gate = self.w1("BTD,DF->BTF", x)
        up = self.w3("BTD,DF->BTF", x)
        h = shd.constrain(swiglu(gate, up, self.cfg.swiglu_limit), (shd.ACT_BATCH, shd.ACT_LENGTH, act_hidden))
        y = self.w2("BTF,FD->BTD", h)
        chex.assert_equal_shape([x, y])
        return y

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(W1 [D, F], W3 [D, F], W2 [F, D]) in the compute dtype, for a kernel that runs this MLP itself."""
        return self.w1.weight(), self.w3.weight(), self.w2.weight()
