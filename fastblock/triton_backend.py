"""Triton backend: launches the fused kernels in fastblock/triton_kernels/ (the contract is in fastblock/ops.py).

Forward, training mode (3 kernels + 1 tiny one):
    1. mixed_conv_fwd_kernel      z = sum_k a_k (conv(x, W_k) + b_k), plus per-tile (mean, M2) of z
    2. bn_stats_finalize_kernel   batch mean / invstd, running-stat update (unbiased variance)
    3. bn_act_normalize_kernel    y = act(BN(z)), act = ReLU or GELU
Forward, eval mode: kernel 1 alone, with BatchNorm + activation folded into its epilogue.
Forward with ``pool`` (a 2x2 max-pool between the convolution and BatchNorm): max_pool2x2_kernel between kernels 1
and 2 pools z and takes the pooled map's per-tile statistics in the same pass (kernel 1 then skips those of the full
map); in eval mode it runs between kernel 1 and the normalisation (no fold: a max commutes with the affine
map only for a scale >= 0).
Backward:
    [pool: max_pool2x2_kernel  -> the pooled map and each window's argmax, recomputed from the saved z]
    bn_act_bwd_reduce_kernel + sum_rows_kernel -> dbeta = sum g, dgamma = sum g*xhat (g = dy*act'(u))
    bn_act_bwd_dz_kernel      -> dz (gradient of the pre-BN activation)
    [pool: max_unpool2x2_kernel -> the gradient routed to each window's maximum]
    mixed_conv_dx_kernel      -> dx
    mixed_conv_dweight_kernel -> dW_k, db_k, da (folded per sample; small partial buffers summed in order)

Memory: forward saves z (one output-sized tensor) and two [Cout] statistics; y is not needed for backward
(the activation's derivative is recomputed from z). Backward materialises dz (output-sized) and partial buffers of
size splits*K*Cout*Cin*KH*KW + N*tiles*K.
"""
from __future__ import annotations

import functools
import os

import torch

from .backend_utils import BackendStatus, empty_buffer, empty_like_layout, forced_schedule, output_shape, stats_dtype


def status(device_type: str) -> BackendStatus:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return BackendStatus(False, f"triton is not importable ({type(exc).__name__}: {exc})")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return BackendStatus(False, "triton needs a CUDA device and torch sees none")
        major, minor = torch.cuda.get_device_capability()
        if major < 7 and not interpret:
            return BackendStatus(False, f"triton needs compute capability >= 7.0, this GPU has {major}.{minor}")
        import triton as _t

        return BackendStatus(True, f"triton {_t.__version__} on {torch.cuda.get_device_name()}"
                             + (" (interpreter)" if interpret else ""))
    if not interpret:
        return BackendStatus(False, "triton needs a CUDA device (CPU tensors run only under TRITON_INTERPRET=1)")
    import triton as _t

    return BackendStatus(True, f"triton {_t.__version__} interpreter on CPU (TRITON_INTERPRET=1; slow, for tests)")


@functools.lru_cache(maxsize=None)
def _kernels():
    from .triton_kernels import batchnorm, configs, conv

    return conv, batchnorm, configs


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype) -> str:
    # Exact fp32 by default; TF32 only when asked for explicitly.
    if dtype == torch.float32 and os.environ.get("FASTBLOCK_ALLOW_TF32", "0") == "1":
        return "tf32"
    return "ieee"


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def _device_arch(t: torch.Tensor):
    """The tensors' GPU as a compute capability number (90 for 9.0), or None off CUDA."""
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _conv_config(rows_per_sample: int, cols: int, dtype: torch.dtype, interp: bool, arch=None) -> dict:
    from .triton_kernels import configs

    return configs.conv_config(rows_per_sample, cols, dtype, interp, forced_schedule(), arch)


def _row_tiles(n: int, p: int, block_m: int, mix: bool) -> int:
    return n * -(-p // block_m) if mix else -(-(n * p) // block_m)


def _tile_counts(n: int, p: int, block_m: int, mix: bool, dtype, device) -> torch.Tensor:
    """Number of valid rows in every row tile of the conv kernel (for the statistics merge)."""
    tiles = _row_tiles(n, p, block_m, mix)
    idx = torch.arange(tiles, device=device, dtype=torch.int64)
    if mix:
        per_sample = -(-p // block_m)
        start = (idx % per_sample) * block_m
        return (p - start).clamp(max=block_m).to(dtype)
    return (n * p - idx * block_m).clamp(max=block_m).to(dtype)


def _on_tensor_device(fn):
    """Runs a launcher with the tensors' GPU current (Triton launches on the current device and stream)."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if first.device.type != "cuda":
            return fn(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(first, *args, **kwargs)

    return wrapper


def _check_weight_size(weight: torch.Tensor) -> None:
    """The kernels index within one W_k in 32 bits (the concatenation loop's weight tiles)."""
    if weight[0].numel() >= 2 ** 31:
        raise ValueError(f"fastblock: the Triton backend needs fewer than 2**31 elements per convolution kernel, "
                         f"got Cout*Cin*KH*KW = {weight[0].numel()}; use backend='extension' or 'reference'")


@_on_tensor_device
def forward(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
            use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward, activation="relu", pool=False):
    import triton

    _check_weight_size(weight)
    conv, bn, configs = _kernels()
    n, cin, h, w = x.shape
    num_convs, cout, _, kh, kw = weight.shape
    _, _, ho, wo = output_shape(x, weight, stride, pad_h, pad_w)
    acc_torch = stats_dtype(x.dtype)
    acc = _tl_dtype(x.dtype)
    interp = _interpreting(x)
    cfg = _conv_config(ho * wo, cout, x.dtype, interp, _device_arch(x))
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    w_fwd = weight.permute(0, 3, 4, 2, 1).contiguous()  # [K, KH, KW, Cin, Cout]: Cout contiguous for the B tile
    # The kernels index x through its strides; every other tensor is read as a dense vector/matrix.
    gates, bias, bn_weight, bn_bias = (t.contiguous() for t in (gates, bias, bn_weight, bn_bias))
    z = empty_like_layout(x, (n, cout, ho, wo))
    grid = (_row_tiles(n, ho * wo, cfg["BLOCK_M"], cfg["MIX"]), triton.cdiv(cout, cfg["BLOCK_N"]))
    gelu = activation == "gelu"
    common = dict(KH=kh, KW=kw, NUM_CONVS=num_convs, MIX=cfg["MIX"], ACC_DTYPE=acc,
                  DOT_PRECISION=_dot_precision(x.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"])
    conv_args = (n, cin, h, w, cout, ho, wo, *x.stride(), *z.stride(), stride, pad_h, pad_w)

    if not use_batch_stats and not pool:  # (a max commutes with BatchNorm's affine map only where its scale >= 0)
        mean = running_mean.to(acc_torch, copy=True)  # outputs must not alias inputs
        invstd = torch.rsqrt(running_var.to(acc_torch) + eps)
        scale = (invstd * bn_weight.to(acc_torch)).contiguous()
        shift = (bn_bias.to(acc_torch) - mean * scale).contiguous()
        y = empty_like_layout(x, z.shape)
        z_out = z if save_for_backward else y  # unused pointer when STORE_Z is off
        conv.mixed_conv_fwd_kernel[grid](x, gates, w_fwd, bias, y, z_out, scale, scale, scale, shift, *conv_args,
                                         EVAL=True, STORE_Z=save_for_backward, GELU=gelu, STATS=False, **common,
                                         **launch)
        return y, _saved(z, save_for_backward), mean, invstd

    # The statistics BatchNorm needs: z's, from the convolution's epilogue, or those of z's 2x2 max-pool, from the
    # pooling kernel (z's own would go unused).
    z_stats = use_batch_stats and not pool
    if z_stats:
        part_mean = empty_buffer((grid[0], cout), acc_torch, x.device)
        part_m2 = empty_buffer((grid[0], cout), acc_torch, x.device)
        counts = _tile_counts(n, ho * wo, cfg["BLOCK_M"], cfg["MIX"], acc_torch, x.device)
    else:
        part_mean = part_m2 = z  # unused pointers
    conv.mixed_conv_fwd_kernel[grid](x, gates, w_fwd, bias, z, z, part_mean, part_m2, part_mean, part_mean,
                                     *conv_args, EVAL=False, STORE_Z=False, GELU=False, STATS=z_stats, **common,
                                     **launch)
    z_norm = z  # what BatchNorm normalises: z, or its 2x2 max-pool
    if pool:
        z_norm, _, stats = _max_pool2x2(z, stats=use_batch_stats)
        if use_batch_stats:
            part_mean, part_m2, counts = stats
    if not use_batch_stats:
        mean = running_mean.to(acc_torch, copy=True)
        invstd = torch.rsqrt(running_var.to(acc_torch) + eps)
        return _normalize(z_norm, mean, invstd, bn_weight, bn_bias, gelu), _saved(z, save_for_backward), mean, invstd
    mean = empty_buffer((cout,), acc_torch, x.device)
    invstd = empty_buffer((cout,), acc_torch, x.device)
    update = running_mean is not None
    # The kernel updates dense running statistics; a strided view is updated through a dense copy.
    rm = running_mean.contiguous() if update else mean
    rv = running_var.contiguous() if update else mean
    bn.bn_stats_finalize_kernel[(triton.cdiv(cout, configs.FINALIZE["BLOCK_C"]),)](
        part_mean, part_m2, counts, mean, invstd, rm, rv,
        part_mean.shape[0], cout, float(eps), float(momentum),
        UPDATE=update, ACC_DTYPE=acc, **configs.FINALIZE,
    )
    if update:
        for view, dense in ((running_mean, rm), (running_var, rv)):
            if dense is not view:
                view.copy_(dense)
    return _normalize(z_norm, mean, invstd, bn_weight, bn_bias, gelu), _saved(z, save_for_backward), mean, invstd


def _saved(z, save_for_backward):
    return z if save_for_backward else z.new_empty((0,))


def _normalize(z, mean, invstd, bn_weight, bn_bias, gelu):
    """y = act(BN(z)) with the given statistics, laid out like z."""
    import triton

    _, bn, configs = _kernels()
    y = empty_like_layout(z, z.shape)
    block = configs.ELEMENTWISE_BLOCK
    bn.bn_act_normalize_kernel[(triton.cdiv(z.numel(), block),)](
        z, y, mean, invstd, bn_weight, bn_bias, z.numel(), z.shape[1], z.shape[2] * z.shape[3],
        GELU=gelu, CHANNELS_LAST=_is_channels_last(z), ACC_DTYPE=_tl_dtype(z.dtype), BLOCK=block,
    )
    return y


def _max_pool2x2(z, stats=False, argmax=False):
    """(p, argmax, (part_mean, part_m2, counts)): the 2x2 max-pool of z laid out like z, each window's position of
    its maximum (uint8 0..3, or None) and the per-row-tile statistics of p for bn_stats_finalize_kernel (or None)."""
    import triton

    _, bn, configs = _kernels()
    n, c, h, w = z.shape
    p = empty_like_layout(z, (n, c, h // 2, w // 2))
    pos = empty_like_layout(z, p.shape, dtype=torch.uint8) if argmax else p
    m = p.numel() // c
    block_r, block_c = configs.pool_tile(_interpreting(z))
    tiles = triton.cdiv(m, block_r)
    acc_torch = stats_dtype(z.dtype)
    parts = [empty_buffer((tiles, c), acc_torch, z.device) for _ in range(2)] if stats else [p, p]
    bn.max_pool2x2_kernel[(tiles, triton.cdiv(c, block_c))](
        z, p, pos, *parts, m, c, p.shape[3], p.shape[2] * p.shape[3], *z.stride(), *p.stride(),
        STATS=stats, ARGMAX=argmax, ACC_DTYPE=_tl_dtype(z.dtype), BLOCK_R=block_r, BLOCK_C=block_c,
    )
    counts = (m - torch.arange(tiles, device=z.device, dtype=torch.int64) * block_r).clamp(max=block_r)
    return p, (pos if argmax else None), ((*parts, counts.to(acc_torch)) if stats else None)


def _max_unpool2x2(dp, argmax, z):
    """The gradient of z from that of its 2x2 max-pool (dp) and the pool's argmax, laid out like z."""
    import triton

    _, bn, configs = _kernels()
    n, c, h, w = z.shape
    # the last row / column of an odd-sized z is in no window: its gradient is 0
    dz = empty_like_layout(z, z.shape, dtype=dp.dtype)
    if h % 2 or w % 2:
        dz.zero_()
    m = dp.numel() // c
    block_r, block_c = configs.pool_tile(_interpreting(z))
    bn.max_unpool2x2_kernel[(triton.cdiv(m, block_r), triton.cdiv(c, block_c))](
        dp, argmax, dz, m, c, dp.shape[3], dp.shape[2] * dp.shape[3], *dp.stride(), *dz.stride(),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return dz


@_on_tensor_device
def backward(dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd, use_batch_stats, stride, pad_h, pad_w,
             need_dx=True, need_dgates=True, activation="relu", pool=False):
    import triton

    _check_weight_size(weight)
    conv, bn, configs = _kernels()
    n, cin, h, w = x.shape
    num_convs, cout, _, kh, kw = weight.shape
    ho, wo = z.shape[2], z.shape[3]
    z_conv = z  # the convolutions' output; BatchNorm normalised it, or its 2x2 max-pool (recomputed here)
    if pool:
        z, argmax, _ = _max_pool2x2(z_conv, argmax=True)
    p = z.shape[2] * z.shape[3]
    m = n * p
    acc_torch = stats_dtype(x.dtype)
    acc = _tl_dtype(x.dtype)
    interp = _interpreting(x)
    channels_last = _is_channels_last(z)
    if dy.stride() != z.stride():
        dy = dy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    gates, bias, bn_weight, bn_bias = (t.contiguous() for t in (gates, bias, bn_weight, bn_bias))
    mean, invstd = mean.contiguous(), invstd.contiguous()

    # --- BatchNorm + activation backward ------------------------------------------------------------------------
    block_r, block_c = (configs.pool_tile if pool else configs.bn_reduce_tile)(interp)
    row_tiles = triton.cdiv(m, block_r)
    part_g = empty_buffer((row_tiles, cout), acc_torch, x.device)
    part_gx = empty_buffer((row_tiles, cout), acc_torch, x.device)
    szn, szc, szh, szw = z.stride()
    bn.bn_act_bwd_reduce_kernel[(row_tiles, triton.cdiv(cout, block_c))](
        dy, z, mean, invstd, bn_weight, bn_bias, part_g, part_gx, m, cout, p, szn, szw, szc,
        GELU=activation == "gelu", ACC_DTYPE=acc, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    sum_g = empty_buffer((cout,), acc_torch, x.device)
    sum_gx = empty_buffer((cout,), acc_torch, x.device)
    for part, out in ((part_g, sum_g), (part_gx, sum_gx)):
        bn.sum_rows_kernel[(triton.cdiv(cout, configs.FINALIZE["BLOCK_C"]),)](part, out, row_tiles, cout,
                                                                               ACC_DTYPE=acc, **configs.FINALIZE)
    dz = empty_like_layout(z, z.shape)
    block = configs.ELEMENTWISE_BLOCK
    bn.bn_act_bwd_dz_kernel[(triton.cdiv(z.numel(), block),)](
        dy, z, dz, mean, invstd, bn_weight, bn_bias, sum_g, sum_gx, z.numel(), cout, p, 1.0 / m,
        GELU=activation == "gelu", BATCH_STATS=use_batch_stats, CHANNELS_LAST=channels_last, ACC_DTYPE=acc,
        BLOCK=block,
    )
    dgamma = sum_gx.to(bn_weight.dtype)
    dbeta = sum_g.to(bn_bias.dtype)
    if pool:
        dz = _max_unpool2x2(dz, argmax, z_conv)

    # --- dx: transposed implicit GEMM -----------------------------------------------------------------------
    dx = x.new_empty((0,))  # not asked for: not computed
    if need_dx:
        cfg = _conv_config(h * w, cin, x.dtype, interp, _device_arch(x))
        w_t = weight.permute(0, 3, 4, 1, 2).contiguous()  # [K, KH, KW, Cout, Cin]: Cin contiguous for the B tile
        dx = empty_like_layout(x, x.shape)
        grid = (_row_tiles(n, h * w, cfg["BLOCK_M"], cfg["MIX"]), triton.cdiv(cin, cfg["BLOCK_N"]))
        conv.mixed_conv_dx_kernel[grid](
            dz, gates, w_t, dx, n, cin, h, w, cout, ho, wo, *dz.stride(), *dx.stride(), stride, pad_h, pad_w,
            KH=kh, KW=kw, NUM_CONVS=num_convs, MIX=cfg["MIX"], ACC_DTYPE=acc,
            DOT_PRECISION=_dot_precision(x.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    # --- dW, db, da: per-sample weight gradients folded in registers ---------------------------------------
    red = kh * kw * cin
    k_pad = triton.next_power_of_2(num_convs)
    dw_cfg = configs.dweight_config(k_pad, x.dtype, interp)
    bm, bn_, bp, warps = dw_cfg["BLOCK_M"], dw_cfg["BLOCK_N"], dw_cfg["BLOCK_P"], dw_cfg["num_warps"]
    co_tiles, r_tiles = triton.cdiv(cout, bm), triton.cdiv(red, bn_)
    # Split the batch so the grid fills a GPU (about 512 programs); each split sums its own samples. A fixed target
    # rather than the SM count: the summation order, and so the bits of dW, are then the same on every GPU model.
    splits = max(1, min(n, configs.DWEIGHT_PROGRAMS // max(1, co_tiles * r_tiles)))
    per_split = triton.cdiv(n, splits)
    splits = triton.cdiv(n, per_split)
    w_r = weight.permute(0, 1, 3, 4, 2).contiguous()  # [K, Cout, KH, KW, Cin]: columns in (dh, dw, ci) order
    dw_part = empty_buffer((splits, num_convs, cout, red), acc_torch, x.device)
    db_part = empty_buffer((splits, num_convs, cout), acc_torch, x.device)
    da_part = empty_buffer((n, co_tiles * r_tiles, num_convs), acc_torch, x.device)
    dab_part = empty_buffer((n, co_tiles, num_convs), acc_torch, x.device)
    conv.mixed_conv_dweight_kernel[(co_tiles, r_tiles, splits)](
        dz, x, gates, w_r, bias, dw_part, db_part, da_part, dab_part,
        n, cin, h, w, cout, ho, wo, per_split, *dz.stride(), *x.stride(), stride, pad_h, pad_w,
        KH=kh, KW=kw, NUM_CONVS=num_convs, K_PAD=k_pad, ACC_DTYPE=acc, DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_M=bm, BLOCK_N=bn_, BLOCK_P=bp, num_warps=warps,
    )
    # Fixed-order sums of the small partial buffers (deterministic).
    dweight = dw_part.sum(0).view(num_convs, cout, kh, kw, cin).permute(0, 1, 4, 2, 3).to(weight.dtype).contiguous()
    dbias = db_part.sum(0).to(bias.dtype)
    # (the same kernel folds da with dW: only returning it is skipped)
    dgates = (da_part.sum(1) + dab_part.sum(1)).to(gates.dtype) if need_dgates else gates.new_empty((0,))
    return dx, dgates, dweight, dbias, dgamma, dbeta
