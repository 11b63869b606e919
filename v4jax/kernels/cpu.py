"""CPU kernels, compiled from C++ on first use and called through the XLA FFI.

    routed_experts(x [T, D], expert [T, K], w1 [E, D, M], w3 [E, D, M], w2 [E, M, D], limit, split) -> [T, K, D]
        out[t, k] = swiglu(x[t] @ W1[e], x[t] @ W3[e], limit) @ W2[e],  e = expert[t, k]   (float32)
    with shared=(sw1 [D, S], sw3 [D, S], sw2 [S, D]) -> [T, K + 1, D], the shared expert's FFN in slot K:
        out[t, K] = swiglu(x[t] @ sw1, x[t] @ sw3, limit) @ sw2

Why: XLA:CPU copies a dynamically sliced expert matrix out of the stacked weights before each
matrix-vector product, so a decoding step's few-row expert FFNs move every chosen weight twice, at about
half the memory bandwidth. `routed_experts_cpu.cc` streams the chosen experts' weights in place, once per
expert for all the rows that chose it, shared out over XLA's intra-op thread pool in tasks of a fraction of
an expert each (`split`), so both threads stream to the end of a call whatever its number of experts
(small_v4's 8 layers at batch 1: 18.6 → 27.0 GB/s; at batch 16, 96 rows, 6.7× faster than 'sorted').
A shared expert rides in the same call (`shared`): alone, its few-row products are too short to occupy the
second thread; here its weights stream on both (a small_v4 step at batch 1: 8.84 → 8.18 ms).

Build: the system C++ compiler (`$CXX`, default `g++`) against jaxlib's FFI headers, into
`$V4JAX_KERNEL_CACHE` (default `~/.cache/v4jax/kernels`), one library per (source, compiler, flags, jaxlib
version, CPU); a finished build is renamed into place, so concurrent processes never load a partial file.
`V4JAX_CPU_KERNELS=0` turns the kernels off. When a kernel cannot be built or loaded,
`routed_experts_available()` is False (with a warning that says why) and callers keep their XLA path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import warnings

import chex
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("routed_experts_cpu.cc")
TARGETS = {  # FFI target name -> the handler the library exports
    "v4jax_routed_experts_f32": "V4jaxRoutedExpertsF32",
    "v4jax_routed_and_shared_experts_f32": "V4jaxRoutedAndSharedExpertsF32",
}
TARGET, SHARED_TARGET = TARGETS
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes", "-Wno-return-type")


def cache_dir() -> pathlib.Path:
    """Where built kernels are kept: `$V4JAX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/v4jax/kernels` (~/.cache)."""
    if os.environ.get("V4JAX_KERNEL_CACHE"):
        return pathlib.Path(os.environ["V4JAX_KERNEL_CACHE"])
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "v4jax" / "kernels"


def _cpu_flags() -> str:
    """This CPU's feature flags (a `-march=native` build is only valid on a CPU that has them)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(source: pathlib.Path, out_dir: pathlib.Path, compiler: str | None = None) -> pathlib.Path:
    """Compile `source` into a shared library in `out_dir` (reused when already built) -> its path.

    Raises RuntimeError naming the compiler and quoting its errors when it is missing or fails."""
    compiler = compiler or os.environ.get("CXX", "g++")
    exe = shutil.which(compiler)
    if exe is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    key = hashlib.sha256(
        "\0".join([source.read_text(), compiler, *FLAGS, jaxlib.__version__, _cpu_flags()]).encode()
    ).hexdigest()[:16]
    library = out_dir / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    command = [exe, *FLAGS, "-I", jax.ffi.include_dir(), str(source), "-o", tmp]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"building {source.name} with {compiler} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, library)
    return library


@functools.cache
def routed_experts_available() -> bool:
    """Build (once per machine), load and register the routed-experts kernel; False when it cannot be."""
    if os.environ.get("V4JAX_CPU_KERNELS", "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build(SOURCE, cache_dir())))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as err:
        warnings.warn(f"v4jax: CPU routed-experts kernel unavailable, using the XLA path: {err}", stacklevel=2)
        return False
    return True


TASK_BYTES = 256 * 2**10  # about what one task of the kernel streams from one weight matrix
SCRATCH_BYTES = 16 * 2**20  # bound on the kernel's partial sums, rows · split · (2M + D) float32


def default_split(d: int, m: int, rows: int = 1) -> int:
    """Tasks per expert and phase: each task streams about TASK_BYTES of W1 and of W3, or of W2; at most 64,
    and fewer when `rows` rows would make the partial sums exceed SCRATCH_BYTES (many rows already give
    enough tasks)."""
    most = min(64, d, m, max(1, SCRATCH_BYTES // (rows * (2 * m + d) * 4)))
    return int(np.clip(round(d * m * 4 / TASK_BYTES), 1, most))


def routed_experts(
    x: jax.Array,
    expert: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    limit: float | None,
    split: int | None = None,
    shared: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """The kernel's out [T, K, D], or [T, K + 1, D] with a `shared` expert (module docstring); every input
    float32, ids outside [0, E) give zero rows; `split` tasks per expert and phase (default `default_split`;
    the shared expert's always by `default_split`). CPU only, after `routed_experts_available()`; no derivative
    of its own (callers wrap it)."""
    t, k = expert.shape
    e, d, m = w1.shape
    split = default_split(d, m, t * k) if split is None else split
    if not 1 <= split <= min(d, m):
        raise ValueError(f"routed_experts: split={split} must lie in [1, min(D, M) = {min(d, m)}]")
    chex.assert_shape(x, (t, d))
    chex.assert_shape([w1, w3], (e, d, m))
    chex.assert_shape(w2, (e, m, d))
    chex.assert_type([x, w1, w3, w2], jnp.float32)
    limit = np.float32(np.inf if limit is None else limit)
    if shared is None:
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((t, k, d), jnp.float32), vmap_method="sequential")
        return call(x, expert.astype(jnp.int32), w1, w3, w2, limit=limit, split=np.int64(split))
    sw1, sw3, sw2 = shared
    s = sw1.shape[-1]
    chex.assert_shape([sw1, sw3], (d, s))
    chex.assert_shape(sw2, (s, d))
    chex.assert_type([sw1, sw3, sw2], jnp.float32)
    call = jax.ffi.ffi_call(SHARED_TARGET, jax.ShapeDtypeStruct((t, k + 1, d), jnp.float32), vmap_method="sequential")
    splits = dict(split=np.int64(split), shared_split=np.int64(default_split(d, s, t)))
    return call(x, expert.astype(jnp.int32), w1, w3, w2, sw1, sw3, sw2, limit=limit, **splits)
