"""Triton kernels for the encoder's fast path, each beside its plain-PyTorch reference.

Modules: ``attention`` (non-causal varlen attention), ``pooling`` (segment pooling), ``norms``
(RMSNorm with fused residual), ``rotary`` (rotary embedding on packed tokens), ``activations``
(gated SiLU / tanh-GELU).
"""
