"""Native kernels for operations that XLA's own code generation handles badly, behind the XLA FFI.

Each kernel has an XLA-only equivalent that callers fall back to (other backends, other dtypes, or when the
kernel cannot be built), so nothing depends on a kernel being present: `cpu.routed_experts_available()`.
"""
