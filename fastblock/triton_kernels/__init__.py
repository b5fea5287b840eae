"""Triton kernels of the fused Block: conv.py (implicit-GEMM convolutions with per-sample kernel mixing, forward,
input gradient, weight/bias/gate gradients) and batchnorm.py (statistics, normalise + ReLU, backward)."""
