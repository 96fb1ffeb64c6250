"""Kernel micro-benchmarks (GEMM, attention, norms, optimizer step, collectives).

Imported as `llmbench.kernels`: a top-level package named `kernels` would shadow Hugging
Face's `kernels`, which transformers probes for. Not written yet (see the issue tracker).
"""
