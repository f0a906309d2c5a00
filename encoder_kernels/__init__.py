"""Triton kernels for the encoder's fast path, each beside its plain-PyTorch reference.

Modules: ``attention`` (varlen attention: bidirectional or causal, soft-cap, sliding window),
``pooling`` (segment pooling), ``norms`` (RMSNorm with fused residual), ``rotary`` (rotary embedding
on packed tokens), ``activations`` (gated SiLU / tanh-GELU); ``sm90`` compiles all of them for Hopper
without a GPU (the test suite's compile gate).
"""
