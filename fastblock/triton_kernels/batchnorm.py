"""BatchNorm + activation kernels around the convolution: statistics finalize, normalise, the backward, and the
2x2 max-pool a pooling Block puts between the convolution and BatchNorm (with the pooled map's statistics).

All reductions are deterministic: per-tile partials written to a buffer, merged in a fixed order.
z, y, dy and dz share one layout (z is allocated like x, dy is made to match), so elementwise kernels walk
storage linearly and recover the channel from the layout (``CHANNELS_LAST``).
"""
import triton
import triton.language as tl


@triton.jit
def bn_stats_finalize_kernel(
    part_mean_ptr, part_m2_ptr, counts_ptr,   # [T, C], [T, C], [T]
    mean_ptr, invstd_ptr,                     # [C] out
    running_mean_ptr, running_var_ptr,        # [C] in/out (UPDATE)
    T, C, eps, momentum,
    UPDATE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge T tiles' (count, mean, M2) into batch mean/invstd; update running stats with the unbiased variance.

    Each chunk of BLOCK_T tiles is combined exactly at once (n = sum n_t, mean = sum n_t mean_t / n,
    M2 = sum M2_t + sum n_t (mean_t - mean)^2), and chunks are folded in order with Chan's pairwise update.
    Bytes: 2*T*C partials read, 2*C written (+ 2*C read/written for the running statistics).
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n_a = tl.zeros([BLOCK_C], ACC_DTYPE)
    mean_a = tl.zeros([BLOCK_C], ACC_DTYPE)
    m2_a = tl.zeros([BLOCK_C], ACC_DTYPE)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        mask = t_ok[:, None] & c_ok[None, :]
        off = t[:, None].to(tl.int64) * C + c[None, :]
        n_t = tl.load(counts_ptr + t, mask=t_ok, other=0.0).to(ACC_DTYPE)
        mean_t = tl.load(part_mean_ptr + off, mask=mask, other=0.0).to(ACC_DTYPE)
        m2_t = tl.load(part_m2_ptr + off, mask=mask, other=0.0).to(ACC_DTYPE)
        n_b = tl.sum(n_t, axis=0)
        mean_b = tl.sum(n_t[:, None] * mean_t, axis=0) / n_b
        dev = tl.where(mask, mean_t - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2_t + n_t[:, None] * dev * dev, axis=0)
        n_ab = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n_ab)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n_ab)
        n_a = n_ab
    var = m2_a / n_a
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + c, mean_a, mask=c_ok)
    tl.store(invstd_ptr + c, invstd, mask=c_ok)
    if UPDATE:
        rm = tl.load(running_mean_ptr + c, mask=c_ok, other=0.0).to(ACC_DTYPE)
        rv = tl.load(running_var_ptr + c, mask=c_ok, other=0.0).to(ACC_DTYPE)
        unbiased = m2_a / (n_a - 1.0)
        rm = (1.0 - momentum) * rm + momentum * mean_a
        rv = (1.0 - momentum) * rv + momentum * unbiased
        tl.store(running_mean_ptr + c, rm.to(running_mean_ptr.dtype.element_ty), mask=c_ok)
        tl.store(running_var_ptr + c, rv.to(running_var_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _channel_of(offs, C, HW, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return offs % C
    return (offs // HW) % C


@triton.jit
def activate(v, GELU: tl.constexpr):
    """The activation after BatchNorm: ReLU, or GELU with the exact (erf) normal CDF as F.gelu."""
    if GELU:
        return v * 0.5 * (1.0 + tl.erf(v * 0.7071067811865476))
    return tl.where(v < 0.0, 0.0, v)  # ReLU that keeps NaN, as torch.relu does (tl.maximum drops it)


@triton.jit
def activation_grad(u, dy, GELU: tl.constexpr):
    """dy * act'(u); GELU's derivative Phi(u) + u * phi(u) as torch's GELU backward writes it."""
    if GELU:
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
        return dy * (cdf + u * pdf)
    return tl.where(u <= 0.0, 0.0, dy)  # torch's ReLU mask is "not <= 0": a NaN passes the gradient


@triton.jit
def bn_act_normalize_kernel(
    z_ptr, y_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
    numel, C, HW,
    GELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = act((z - mean) * invstd * gamma + beta), act = ReLU or GELU. Bytes: read z, write y (per-channel vectors
    stay in cache)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    c = _channel_of(offs, C, HW, CHANNELS_LAST)
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(ACC_DTYPE)
    scale = tl.load(invstd_ptr + c, mask=ok, other=0.0).to(ACC_DTYPE) * tl.load(gamma_ptr + c, mask=ok, other=0.0)
    shift = tl.load(beta_ptr + c, mask=ok, other=0.0) - tl.load(mean_ptr + c, mask=ok, other=0.0) * scale
    y = activate(z * scale + shift, GELU)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row_tile(M, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a [M rows, C channels] view: row and channel indices, their masks and the tile's."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < M
    c_ok = c < C
    return rows, c, r_ok, c_ok, r_ok[:, None] & c_ok[None, :]


@triton.jit
def _pool_addresses(rows, c, PW, PHW, spn, spc, sph, spw, szn, szc, szh, szw):
    """For pooled rows m = n*PHW + ph*PW + pw and channels c: the offset of (n, c, ph, pw) in the pooled map and of
    its 2x2 window's top-left element (n, c, 2ph, 2pw) in z."""
    n = rows // PHW
    ph = (rows % PHW) // PW
    pw = rows % PW
    c64 = c[None, :].to(tl.int64)
    return ((n * spn + ph * sph + pw * spw)[:, None] + c64 * spc,
            (n * szn + 2 * ph * szh + 2 * pw * szw)[:, None] + c64 * szc)


@triton.jit
def bn_act_bwd_reduce_kernel(
    dy_ptr, z_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
    part_g_ptr, part_gx_ptr,                 # [T, C]: per row tile, sum g and sum g * xhat
    M, C, HW, srow_n, srow_hw, sc,           # rows m = n*HW + p; offset = n*srow_n + p*srow_hw + c*sc
    GELU: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial sums of g = dy * act'(u) (ReLU: dy * [u > 0]) and g * xhat per (row tile, channel); u is
    recomputed from z, so y need not be saved. Bytes: read dy and z once; write 2*T*C partials."""
    rows, c, r_ok, c_ok, mask = _row_tile(M, C, BLOCK_R, BLOCK_C)
    off = ((rows // HW) * srow_n + (rows % HW) * srow_hw)[:, None] + c[None, :].to(tl.int64) * sc
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0).to(ACC_DTYPE)
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(ACC_DTYPE)
    beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(ACC_DTYPE)
    z = tl.load(z_ptr + off, mask=mask, other=0.0).to(ACC_DTYPE)
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC_DTYPE)
    xhat = (z - mean[None, :]) * invstd[None, :]
    g = tl.where(mask, activation_grad(xhat * gamma[None, :] + beta[None, :], dy, GELU), 0.0)
    part = tl.program_id(0).to(tl.int64) * C + c
    tl.store(part_g_ptr + part, tl.sum(g, axis=0), mask=c_ok)
    tl.store(part_gx_ptr + part, tl.sum(g * xhat, axis=0), mask=c_ok)


@triton.jit
def sum_rows_kernel(part_ptr, out_ptr, T, C, ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = sum_t part[t, c], in a fixed order (deterministic)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros([BLOCK_C], ACC_DTYPE)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        vals = tl.load(part_ptr + t[:, None].to(tl.int64) * C + c[None, :], mask=(t < T)[:, None] & c_ok[None, :],
                       other=0.0)
        acc += tl.sum(vals.to(ACC_DTYPE), axis=0)
    tl.store(out_ptr + c, acc.to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def bn_act_bwd_dz_kernel(
    dy_ptr, z_ptr, dz_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, sum_g_ptr, sum_gx_ptr,
    numel, C, HW, inv_count,
    GELU: tl.constexpr, BATCH_STATS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dz = gamma*invstd * (g - [batch stats] (sum_g + xhat * sum_gx) / count), g = dy * act'(u).
    Bytes: read dy and z, write dz."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    c = _channel_of(offs, C, HW, CHANNELS_LAST)
    mean = tl.load(mean_ptr + c, mask=ok, other=0.0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + c, mask=ok, other=0.0).to(ACC_DTYPE)
    gamma = tl.load(gamma_ptr + c, mask=ok, other=0.0).to(ACC_DTYPE)
    beta = tl.load(beta_ptr + c, mask=ok, other=0.0).to(ACC_DTYPE)
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(ACC_DTYPE)
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(ACC_DTYPE)
    xhat = (z - mean) * invstd
    g = activation_grad(xhat * gamma + beta, dy, GELU)
    if BATCH_STATS:
        sum_g = tl.load(sum_g_ptr + c, mask=ok, other=0.0).to(ACC_DTYPE)
        sum_gx = tl.load(sum_gx_ptr + c, mask=ok, other=0.0).to(ACC_DTYPE)
        g = g - (sum_g + xhat * sum_gx) * inv_count
    tl.store(dz_ptr + offs, (g * gamma * invstd).to(dz_ptr.dtype.element_ty), mask=ok)


@triton.jit
def max_pool2x2_kernel(
    z_ptr, p_ptr, argmax_ptr, part_mean_ptr, part_m2_ptr,   # p/argmax [N, C, PH, PW] (strides of p); parts [T, C]
    M, C, PW, PHW, szn, szc, szh, szw, spn, spc, sph, spw,  # pooled rows m = n*PHW + ph*PW + pw
    STATS: tl.constexpr, ARGMAX: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """p = 2x2 / stride-2 max-pool of z (F.max_pool2d(z, 2): the first maximum of a window in row-major order, a
    NaN over any number), with each window's position 0..3 of its maximum (ARGMAX, for the backward) and the
    per-(row tile, channel) mean and M2 of p (STATS): the pooled map's BatchNorm statistics in the same pass, merged
    by bn_stats_finalize_kernel. Bytes: read z once, write p (+ a byte per output for ARGMAX, 2*T*C partials)."""
    rows, c, r_ok, c_ok, mask = _row_tile(M, C, BLOCK_R, BLOCK_C)
    out, top_left = _pool_addresses(rows, c, PW, PHW, spn, spc, sph, spw, szn, szc, szh, szw)
    best = tl.load(z_ptr + top_left, mask=mask, other=0.0)
    pos = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
    for i in tl.static_range(1, 4):
        v = tl.load(z_ptr + top_left + (i // 2) * szh + (i % 2) * szw, mask=mask, other=0.0)
        take = (v > best) | (v != v)  # a later position: strictly greater, or NaN (the last NaN, as ATen)
        best = tl.where(take, v, best)
        pos = tl.where(take, i, pos)
    tl.store(p_ptr + out, best, mask=mask)
    if ARGMAX:
        tl.store(argmax_ptr + out, pos.to(tl.uint8), mask=mask)
    if STATS:
        count = tl.sum(r_ok.to(ACC_DTYPE), axis=0)
        v = tl.where(mask, best.to(ACC_DTYPE), 0.0)
        tile_mean = tl.sum(v, axis=0) / count
        dev = tl.where(mask, v - tile_mean[None, :], 0.0)
        part = tl.program_id(0).to(tl.int64) * C + c
        tl.store(part_mean_ptr + part, tile_mean, mask=c_ok)
        tl.store(part_m2_ptr + part, tl.sum(dev * dev, axis=0), mask=c_ok)


@triton.jit
def max_unpool2x2_kernel(
    dp_ptr, argmax_ptr, dz_ptr,                             # dp/argmax [N, C, PH, PW] (strides of dp); dz like z
    M, C, PW, PHW, spn, spc, sph, spw, szn, szc, szh, szw,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The backward of max_pool2x2_kernel: each window's gradient at the position of its maximum, 0 at the other
    three (the row and column an odd-sized z drops are zeroed by the caller). Bytes: read dp and argmax, write dz."""
    rows, c, _, _, mask = _row_tile(M, C, BLOCK_R, BLOCK_C)
    src, top_left = _pool_addresses(rows, c, PW, PHW, spn, spc, sph, spw, szn, szc, szh, szw)
    g = tl.load(dp_ptr + src, mask=mask, other=0.0)
    pos = tl.load(argmax_ptr + src, mask=mask, other=0).to(tl.int32)
    for i in tl.static_range(0, 4):
        tl.store(dz_ptr + top_left + (i // 2) * szh + (i % 2) * szw, tl.where(pos == i, g, 0.0), mask=mask)
