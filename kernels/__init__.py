"""Kernel micro-benchmarks (GEMM, attention, norms, MLP, optimizer step, collectives).

Imported as `llmbench.kernels`: a top-level package named `kernels` would shadow Hugging
Face's `kernels`, which transformers probes for. `llmbench kernels` runs them on the rank
pool (llmbench.microbench); `run.run_kernels` is one rank's part.
"""
