"""The names a user picks from, owned here and imported everywhere else: the pooling modes, the
backends and the dtypes. Standard library only, so that the commands offer them in ``--help`` without loading torch.
"""

# How one input's token rows become its embedding (see Engine.encode): the mean over the pooled
# tokens, a position-weighted mean (later tokens weigh more), the last pooled token, the first one.
POOLING_MODES = ("mean", "weighted_mean", "last_token", "bos_token")

# The engine's backends (see engine/backends.py): plain PyTorch, the fused Triton kernels, the CPU's
# in-place ops.
BACKENDS = ("reference", "triton", "cpu")

# Floating-point dtypes of stored weights and of the computation (``torch.<name>``).
DTYPE_NAMES = ("float32", "float16", "bfloat16")
# "auto": float32 on a CPU, bfloat16 on CUDA.
COMPUTE_DTYPES = ("auto", *DTYPE_NAMES)
