"""Implicit-GEMM convolution kernels with per-sample kernel mixing, for the forward and the input gradient.

Notation: x [N, Cin, H, W] (any strides), K kernels W_k [Cout, Cin, KH, KW], gates a [N, K], output pixels
P = Ho*Wo, reduction length R = Cin*KH*KW.

Both kernels run one of two exact schedules (``MIX`` constexpr), chosen per shape by the host:

* MIX=True -- a row tile lies inside one sample n, so the B tile can be mixed on the fly:
  ``B = sum_k a[n,k] W_k[tile]``. One MMA per reduction step; K FMAs per B element to mix.
  FLOPs 2*N*P*Cout*R (one convolution) + the mixing; bytes: x once per Cout tile, K weight tiles per row tile.
* MIX=False -- the K-fold concatenation ``conv([a_1 x .. a_K x], [W_1 .. W_K])``: a row tile may span many
  samples (small feature maps such as 4x4, where a per-sample tile would be mostly padding and every sample
  would reload all K weights), so each A tile is loaded once and its rows are scaled by a[n(row), k] before
  the k-th MMA. FLOPs K * 2*N*P*Cout*R, but the weights are read once per row tile.

The reduction loops over the KH*KW taps (unrolled) and then over input-channel chunks, so the spatial
bounds of a tap are computed once per tap and not per element. All offsets are int64.
"""
import triton
import triton.language as tl

from .batchnorm import activate


@triton.jit
def _row_tile(pid_m, N, P, BLOCK_M: tl.constexpr, MIX: tl.constexpr):
    """Rows of an implicit-GEMM tile: (sample of the tile when MIX, per-row sample, pixel within it, valid)."""
    if MIX:
        tiles_per_sample = tl.cdiv(P, BLOCK_M)
        n_scalar = pid_m // tiles_per_sample
        pix = (pid_m % tiles_per_sample) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = pix < P
        n_row = tl.zeros([BLOCK_M], tl.int64) + n_scalar
    else:
        n_scalar = pid_m * 0  # unused: rows span samples
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < N * P
        n_row = rows // P
        pix = (rows % P).to(tl.int32)
    return n_scalar, n_row, pix, row_valid


@triton.jit
def _mixed_dot(acc, a, w_ptr, w_off, w_mask, gates_ptr, n_scalar, k_stride,
               NUM_CONVS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The per-sample mixing schedule: acc += A @ (sum_k a[n,k] W_k[tile]), the K weight tiles mixed with the
    tile's one sample's gates before a single MMA."""
    k_stride = tl.cast(k_stride, tl.int64)  # K * KH*KW*Cin*Cout can pass 2**31 elements
    b_mix = tl.zeros([BLOCK_K, BLOCK_N], ACC_DTYPE)
    for k in tl.static_range(NUM_CONVS):
        g = tl.load(gates_ptr + n_scalar * NUM_CONVS + k).to(ACC_DTYPE)
        wk = tl.load((w_ptr + k * k_stride) + w_off, mask=w_mask, other=0.0)  # scalar int64 offset first
        b_mix += g * wk.to(ACC_DTYPE)
    return tl.dot(a, b_mix.to(a.dtype), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _flat_step(it, per_k, n_cb, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step ``it`` of the concatenation's flat reduction loop -> (k, tap, first channel, dh, dw)."""
    k = it // per_k
    rem = it - k * per_k
    tap = rem // n_cb
    c0 = (rem - tap * n_cb) * BLOCK_K
    dh = tap // KW
    return k, tap, c0, dh, tap - dh * KW


@triton.jit
def _concat_dot(acc, a, w_ptr, k, k_stride, w_off, w_mask, gates_ptr, n_row, row_valid,
                NUM_CONVS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The K-fold concatenation schedule, one step: acc += (a[n,k] * A rows) @ W_k[tile], each row scaled by its
    own sample's gate (``w_off``: the tile's offsets inside W_k, 32-bit)."""
    g_rows = tl.load(gates_ptr + n_row * NUM_CONVS + k, mask=row_valid, other=0.0).to(ACC_DTYPE)
    wk = tl.load(w_ptr + k.to(tl.int64) * k_stride + w_off, mask=w_mask, other=0.0)
    a_k = (a.to(ACC_DTYPE) * g_rows[:, None]).to(a.dtype)
    return tl.dot(a_k, wk, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def mixed_conv_fwd_kernel(
    x_ptr, gates_ptr, w_ptr, b_ptr,        # w_ptr: weights permuted to [K, KH, KW, Cin, Cout] (contiguous)
    out_ptr, z_ptr,                        # EVAL: out = y (and z if STORE_Z); training: out = z
    part_mean_ptr, part_m2_ptr,            # training: per-(row tile, channel) mean and M2 of z, [tiles, Cout]
    scale_ptr, shift_ptr,                  # EVAL: BatchNorm folded to y = act(z * scale + shift)
    N, Cin, H, W, Cout, Ho, Wo,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    stride, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, NUM_CONVS: tl.constexpr,
    MIX: tl.constexpr, EVAL: tl.constexpr, STORE_Z: tl.constexpr, GELU: tl.constexpr, STATS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """z = sum_k a[n,k] (conv(x, W_k) + b_k); then either the BatchNorm-activation epilogue (EVAL: ReLU, or GELU
    when GELU) or z, with its tile stats when STATS (off where BatchNorm normalises z's max-pool instead).

    Training epilogue: per row tile and channel, the tile mean and the sum of squared deviations from it
    (M2). The finalize kernel merges them in a fixed order (Chan et al.), so statistics are deterministic and
    free of the cancellation that plain sum / sum-of-squares suffers.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_scalar, n_row, pix, row_valid = _row_tile(pid_m, N, Ho * Wo, BLOCK_M, MIX)
    oh = pix // Wo
    ow = pix % Wo
    ih0 = oh * stride - pad_h
    iw0 = ow * stride - pad_w
    x_row = n_row * sxn
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_valid = co < Cout
    cols = tl.arange(0, BLOCK_K)
    taps_stride = KH * KW * Cin * Cout  # elements between W_k and W_{k+1}

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)
    if MIX:
        for dh in tl.static_range(KH):
            for dw in tl.static_range(KW):
                ih = ih0 + dh
                iw = iw0 + dw
                tap_ok = row_valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_tap = x_row + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
                w_tap = (dh * KW + dw) * Cin * Cout
                for c0 in range(0, Cin, BLOCK_K):
                    ci = c0 + cols
                    ci_ok = ci < Cin
                    a = tl.load(x_ptr + x_tap[:, None] + ci[None, :].to(tl.int64) * sxc,
                                mask=tap_ok[:, None] & ci_ok[None, :], other=0.0)
                    w_off = w_tap + ci[:, None].to(tl.int64) * Cout + co[None, :]
                    acc = _mixed_dot(acc, a, w_ptr, w_off, ci_ok[:, None] & co_valid[None, :], gates_ptr, n_scalar,
                                     taps_stride, NUM_CONVS, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_N)
    else:
        # the K-fold concatenation (each A row scaled by its own sample's gate a[n,k]) as one flat reduction loop
        # over (k, tap, channel block), software-pipelined as a whole: the body holds one A and one W tile, like a
        # plain convolution. (Unrolled taps with K weight tiles per step spilled at the 8x8/4x4 stages.)
        n_cb = tl.cdiv(Cin, BLOCK_K)
        per_k = KH * KW * n_cb
        for it in range(0, NUM_CONVS * per_k):
            k, tap, c0, dh, dw = _flat_step(it, per_k, n_cb, KW, BLOCK_K)
            ih = ih0 + dh
            iw = iw0 + dw
            tap_ok = row_valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ci = c0 + cols
            ci_ok = ci < Cin
            a = tl.load(x_ptr + (x_row + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None]
                        + ci[None, :].to(tl.int64) * sxc, mask=tap_ok[:, None] & ci_ok[None, :], other=0.0)
            acc = _concat_dot(acc, a, w_ptr, k, taps_stride, tap * Cin * Cout + ci[:, None] * Cout + co[None, :],
                              ci_ok[:, None] & co_valid[None, :], gates_ptr, n_row, row_valid, NUM_CONVS,
                              ACC_DTYPE, DOT_PRECISION)

    # mixed bias: sum_k a[n,k] b_k
    for k in tl.static_range(NUM_CONVS):
        g_rows = tl.load(gates_ptr + n_row * NUM_CONVS + k, mask=row_valid, other=0.0).to(ACC_DTYPE)
        bk = tl.load(b_ptr + k * Cout + co, mask=co_valid, other=0.0).to(ACC_DTYPE)
        acc += g_rows[:, None] * bk[None, :]

    out_off = (n_row * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow)[:, None] + co[None, :].to(tl.int64) * soc
    valid = row_valid[:, None] & co_valid[None, :]
    if EVAL:
        scale = tl.load(scale_ptr + co, mask=co_valid, other=0.0).to(ACC_DTYPE)
        shift = tl.load(shift_ptr + co, mask=co_valid, other=0.0).to(ACC_DTYPE)
        y = activate(acc * scale[None, :] + shift[None, :], GELU)
        tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=valid)
        if STORE_Z:
            tl.store(z_ptr + out_off, acc.to(z_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=valid)
    if STATS:
        count = tl.sum(row_valid.to(ACC_DTYPE), axis=0)
        tile_mean = tl.sum(tl.where(valid, acc, 0.0), axis=0) / count
        dev = tl.where(valid, acc - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        part = pid_m.to(tl.int64) * Cout + co
        tl.store(part_mean_ptr + part, tile_mean, mask=co_valid)
        tl.store(part_m2_ptr + part, tile_m2, mask=co_valid)


@triton.jit
def mixed_conv_dx_kernel(
    dz_ptr, gates_ptr, wt_ptr, dx_ptr,     # wt_ptr: weights permuted to [K, KH, KW, Cout, Cin] (contiguous)
    N, Cin, H, W, Cout, Ho, Wo,
    sdn, sdc, sdh, sdw,                    # dz strides
    sxn, sxc, sxh, sxw,                    # dx strides
    stride, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, NUM_CONVS: tl.constexpr, MIX: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[n] = sum_k a[n,k] conv_transpose(dz[n], W_k): an implicit GEMM over input pixels (rows) x Cin (cols),
    reducing over taps and Cout. FLOPs as the forward (x K for MIX=False); bytes: dz once per Cin tile.

    Input pixel (ih, iw) receives tap (dh, dw) from output pixel ((ih + pad - dh) / stride, ...) when that
    division is exact and in range. With stride 2 three taps in four are masked off for a given pixel: simple
    and exact, at the price of wasted loads (a stride-phase decomposition would avoid them).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_scalar, n_row, pix, row_valid = _row_tile(pid_m, N, H * W, BLOCK_M, MIX)
    ih = pix // W
    iw = pix % W
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_valid = ci < Cin
    cols = tl.arange(0, BLOCK_K)
    taps_stride = KH * KW * Cout * Cin
    dz_row = n_row * sdn

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)
    if MIX:
        for dh in tl.static_range(KH):
            for dw in tl.static_range(KW):
                oh_num = ih + pad_h - dh
                ow_num = iw + pad_w - dw
                oh = oh_num // stride
                ow = ow_num // stride
                tap_ok = (row_valid & (oh_num >= 0) & (ow_num >= 0) & (oh_num % stride == 0)
                          & (ow_num % stride == 0) & (oh < Ho) & (ow < Wo))
                dz_tap = dz_row + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
                w_tap = (dh * KW + dw) * Cout * Cin
                for c0 in range(0, Cout, BLOCK_K):
                    co = c0 + cols
                    co_ok = co < Cout
                    a = tl.load(dz_ptr + dz_tap[:, None] + co[None, :].to(tl.int64) * sdc,
                                mask=tap_ok[:, None] & co_ok[None, :], other=0.0)
                    w_off = w_tap + co[:, None].to(tl.int64) * Cin + ci[None, :]
                    acc = _mixed_dot(acc, a, wt_ptr, w_off, co_ok[:, None] & ci_valid[None, :], gates_ptr,
                                     n_scalar, taps_stride, NUM_CONVS, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_N)
    else:
        # the concatenation as one flat loop over (k, tap, channel block), as in the forward kernel
        n_cb = tl.cdiv(Cout, BLOCK_K)
        per_k = KH * KW * n_cb
        for it in range(0, NUM_CONVS * per_k):
            k, tap, c0, dh, dw = _flat_step(it, per_k, n_cb, KW, BLOCK_K)
            oh_num = ih + pad_h - dh
            ow_num = iw + pad_w - dw
            oh = oh_num // stride
            ow = ow_num // stride
            tap_ok = (row_valid & (oh_num >= 0) & (ow_num >= 0) & (oh_num % stride == 0) & (ow_num % stride == 0)
                      & (oh < Ho) & (ow < Wo))
            co = c0 + cols
            co_ok = co < Cout
            a = tl.load(dz_ptr + (dz_row + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw)[:, None]
                        + co[None, :].to(tl.int64) * sdc, mask=tap_ok[:, None] & co_ok[None, :], other=0.0)
            acc = _concat_dot(acc, a, wt_ptr, k, taps_stride, tap * Cout * Cin + co[:, None] * Cin + ci[None, :],
                              co_ok[:, None] & ci_valid[None, :], gates_ptr, n_row, row_valid, NUM_CONVS,
                              ACC_DTYPE, DOT_PRECISION)

    dx_off = (n_row * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] + ci[None, :].to(tl.int64) * sxc
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=row_valid[:, None] & ci_valid[None, :])


@triton.jit
def mixed_conv_dweight_kernel(
    dz_ptr, x_ptr, gates_ptr, w_ptr, b_ptr,   # w_ptr: weights permuted to [K, Cout, KH, KW, Cin] (contiguous)
    dw_part_ptr,                              # [splits, K, Cout, KH*KW*Cin]   sum over this split's samples
    db_part_ptr,                              # [splits, K, Cout]
    da_part_ptr,                              # [N, num_tiles, K]   <W_k tile, G_n tile>
    dab_part_ptr,                             # [N, num_co_tiles, K] <b_k tile, sum_hw dz_n tile>
    N, Cin, H, W, Cout, Ho, Wo, samples_per_split,
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    stride, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, NUM_CONVS: tl.constexpr, K_PAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Weight, bias and gate gradients without an [N, Cout, Cin, KH, KW] per-sample weight gradient in memory.

    For each sample n of its split, a program computes its tile of G_n = dz_n (x) im2col(x_n) (an M=Cout-tile,
    N=R-tile GEMM reducing over the P output pixels) in registers, then folds it straight into
        dW_k += a[n,k] G_n,      da[n,k] += <W_k, G_n>
    and, on the first R tile, the bias terms from s_n = sum_hw dz_n:
        db_k += a[n,k] s_n,      da[n,k] += <b_k, s_n>.
    FLOPs: 2*N*P*Cout*R for G plus 4*N*K*Cout*R for the folds; bytes: dz and x once per (Cout, R) tile.
    Partial results go to small buffers reduced on the host in a fixed order (deterministic, no atomics).
    """
    pid_co = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_r_tiles = tl.num_programs(1)
    R = KH * KW * Cin
    P = Ho * Wo
    co = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
    co_valid = co < Cout
    r = pid_r * BLOCK_N + tl.arange(0, BLOCK_N)
    r_valid = r < R
    ci = r % Cin                      # column r <-> (dh, dw, ci) in [KH, KW, Cin] order
    dw_tap = (r // Cin) % KW
    dh_tap = r // (Cin * KW)
    kk = tl.arange(0, K_PAD)
    k_valid = kk < NUM_CONVS
    tile = co[:, None].to(tl.int64) * R + r[None, :]
    tile_mask = co_valid[:, None] & r_valid[None, :]
    # the K weight tiles, [K_PAD, BLOCK_M, BLOCK_N]; constant over samples
    w3 = tl.load(w_ptr + kk[:, None, None].to(tl.int64) * Cout * R + tile[None, :, :],
                 mask=k_valid[:, None, None] & tile_mask[None, :, :], other=0.0).to(ACC_DTYPE)
    b2 = tl.load(b_ptr + kk[:, None] * Cout + co[None, :], mask=k_valid[:, None] & co_valid[None, :],
                 other=0.0).to(ACC_DTYPE)
    first_r_tile = pid_r == 0

    dw_acc = tl.zeros([K_PAD, BLOCK_M, BLOCK_N], ACC_DTYPE)
    db_acc = tl.zeros([K_PAD, BLOCK_M], ACC_DTYPE)
    n_start = pid_s.to(tl.int64) * samples_per_split
    n_end = tl.minimum(n_start + samples_per_split, N)
    for i in range(0, n_end - n_start):
        n64 = n_start + i
        g_tile = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)
        dz_sum = tl.zeros([BLOCK_M], ACC_DTYPE)
        for p0 in range(0, P, BLOCK_P):
            pix = p0 + tl.arange(0, BLOCK_P)
            pix_ok = pix < P
            oh = pix // Wo
            ow = pix % Wo
            dz_t = tl.load(dz_ptr + n64 * sdn + co[:, None].to(tl.int64) * sdc
                           + (oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw)[None, :],
                           mask=co_valid[:, None] & pix_ok[None, :], other=0.0)
            ih = (oh * stride - pad_h)[:, None] + dh_tap[None, :]
            iw = (ow * stride - pad_w)[:, None] + dw_tap[None, :]
            x_ok = pix_ok[:, None] & r_valid[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_t = tl.load(x_ptr + n64 * sxn + ci[None, :].to(tl.int64) * sxc + ih.to(tl.int64) * sxh
                          + iw.to(tl.int64) * sxw, mask=x_ok, other=0.0)
            g_tile = tl.dot(dz_t, x_t, g_tile, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            dz_sum += tl.sum(dz_t.to(ACC_DTYPE), axis=1)
        a_n = tl.load(gates_ptr + n64 * NUM_CONVS + kk, mask=k_valid, other=0.0).to(ACC_DTYPE)
        dw_acc += a_n[:, None, None] * g_tile[None, :, :]
        da_tile = tl.sum(tl.sum(w3 * g_tile[None, :, :], axis=2), axis=1)
        tile_id = pid_co * num_r_tiles + pid_r
        tl.store(da_part_ptr + (n64 * tl.num_programs(0) * num_r_tiles + tile_id) * NUM_CONVS + kk, da_tile,
                 mask=k_valid)
        db_acc += a_n[:, None] * dz_sum[None, :]
        dab = tl.sum(b2 * dz_sum[None, :], axis=1)
        tl.store(dab_part_ptr + (n64 * tl.num_programs(0) + pid_co) * NUM_CONVS + kk, dab,
                 mask=k_valid & first_r_tile)

    split = pid_s.to(tl.int64) * NUM_CONVS
    tl.store(dw_part_ptr + (split + kk[:, None, None]) * Cout * R + tile[None, :, :], dw_acc,
             mask=k_valid[:, None, None] & tile_mask[None, :, :])
    tl.store(db_part_ptr + (split + kk[:, None]) * Cout + co[None, :], db_acc,
             mask=k_valid[:, None] & co_valid[None, :] & first_r_tile)
