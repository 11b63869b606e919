"""Test setup: 8 emulated CPU devices, forced before anything imports jax."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 emulated devices. The suite is dominated by compiling many small programs: XLA:CPU backend optimisation
# level 0 makes that ~40% faster, and the classic (non-emitter) fusion codegen in one split about halves
# it again (same numerics: no fast-math either way); notebooks inherit the flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    + " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

import v4jax.presets  # noqa: E402

# The non-partitionable threefry compiles ~3x faster on CPU; parameter values are not part of any test
# (sharding tests initialise once and then place the same arrays on each mesh).
jax.config.update("jax_threefry_partitionable", False)


@pytest.fixture(scope="session")
def tiny_params():
    """Parameters of the tiny preset, initialised once per test process."""
    return v4jax.model.init_params(v4jax.presets.tiny(), jax.random.key(0))


@pytest.fixture
def tiny_cfg():
    return v4jax.presets.tiny()


@pytest.fixture
def rng():
    return jax.random.key(0)
