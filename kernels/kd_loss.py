"""Fused KD + CE forward (+ gradient) Triton kernel. Installed as ``spacedkd_fast.kernels.kd_loss``.

One launch computes, for every row, the loss of ``spacedkd_fast.loss.reference`` and, when asked, the gradient
with respect to the student logits (and the teacher logits). Math, per row (s student, t teacher, y label)::

    pass 1 (online over column blocks, one read of s and t):
        m_s = max s          Z1 = Σ exp(s − m_s)          ZT = Σ exp((s − m_s)/T)       (one max serves s and s/T)
        m_t = max t          Zt = Σ exp((t − m_t)/T)
        A   = Σ exp((t − m_t)/T) · d,   d = (t − m_t) − (s − m_s)                      (logit-difference KL form)
        KL  = A / (T·Zt) + log ZT − log Zt                                             (no per-element log)
        CE  = (1−ε)·(m_s − s_y + log Z1) + ε·(m_s − mean_U(s) + log Z1)                U: tokens with s > −inf
    pass 2 (column blocks in reverse order, so the first blocks re-read are the ones still in cache):
        ∂/∂s = (1−α)·(exp(s − m_s)/Z1 − (1−ε)·onehot(y) − ε·1_U/|U|) + (α·c/T)·(exp((s − m_s)/T)/ZT − p_t)
        ∂/∂t = (α·c/T²) · p_t · (d − A/Zt),      p_t = exp((t − m_t)/T)/Zt

Measuring d against the row maxima keeps the KL accurate for huge logits (1e4 at T = 0.05): where the
student equals the teacher up to a shift, every d is exactly 0. When a row fits in one block the kernel makes a
single pass: the row stays in registers between the statistics and the gradient.

Masked tokens (−inf logits, see the reference) cost no branch: a term whose teacher weight is 0 is selected away
before it can be 0·inf or −inf − (−inf), a fully masked block keeps the finite stand-in maxima, and label smoothing
counts the student logits that are not −inf (|U|) beside their sum.

A program owns a tile ``[ROWS, KP, BV]``: ROWS teacher rows × the K students that learn from them (KP = K
rounded up to a power of 2) × BV columns. The teacher block is loaded once as ``[ROWS, 1, BV]`` and broadcast over
the students, so a multi-student call reads the teacher once. In ``SINGLE_PROGRAM`` mode one program walks every
tile and writes the reduced loss itself, which makes a small forward one launch with no follow-up reduction.

The gradients are written already divided by the number of non-ignored rows when the reduction is a mean, so the
backward is one multiply by grad_output whatever the path.
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # a plain float global compiles only in the interpreter


@triton.jit
def _columns(cols, v0, COL64: tl.constexpr):
    """Column indices ``cols + v0``, widened to int64 when ``column · stride`` may pass 2^31 (COL64)."""
    c = cols + v0
    if COL64:
        c = c.to(tl.int64)
    return c


@triton.jit
def _kd_tile(
    row_start, total,
    loss_ptr, grad_s_ptr, grad_t_ptr,
    s_ptr, s_sk, s_s0, s_s1, s_sv,
    t_ptr, t_s0, t_s1, t_sv,
    y_ptr, y_stride,
    K, N, R1, V,
    inv_temp, ce_weight, kd_weight, label_smoothing, ignore_index, grad_scale,
    HAS_TARGET: tl.constexpr, HAS_CE: tl.constexpr, HAS_KD: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, TEMP_IS_ONE: tl.constexpr,
    ROWS: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, ONE_BLOCK: tl.constexpr, COL64: tl.constexpr,
    SINGLE_PROGRAM: tl.constexpr,
):
    """Loss (and gradients) of teacher rows ``[row_start, row_start + ROWS)``.

    The loss is settled before the gradient pass, so it is not live across it (ptxas spilled it there): in
    SINGLE_PROGRAM mode the tile's losses are added to ``total`` (``[KP]``, returned), otherwise the per-row losses
    are stored at ``loss_ptr`` (``(K, N)``; a mean's already divided by the count).

    Rows that are ignored, past N, or students past K get loss 0 and gradient 0 (the gradient is written as 0 so
    the caller can allocate it uninitialized); their logits are never loaded.
    """
    rows = row_start + tl.arange(0, ROWS)  # [ROWS]
    row_in = rows < N
    rows64 = rows.to(tl.int64)
    if HAS_TARGET:
        y = tl.load(y_ptr + rows64 * y_stride, mask=row_in, other=ignore_index).to(tl.int64)
        valid = row_in & (y != ignore_index)
        bad_label = valid & ((y < 0) | (y >= V))
    else:
        y = tl.zeros([ROWS], dtype=tl.int64)
        valid = row_in
        bad_label = tl.zeros([ROWS], dtype=tl.int1)

    ks = tl.arange(0, KP)
    k_in = ks < K
    # [ROWS, KP, 1] row offsets into the student (K, R0, R1, V) and teacher (R0, R1, V) views.
    r0 = rows64 // R1
    r1 = rows64 % R1
    s_row = s_ptr + (r0 * s_s0 + r1 * s_s1)[:, None, None] + (ks.to(tl.int64) * s_sk)[None, :, None]
    t_row = t_ptr + (r0 * t_s0 + r1 * t_s1)[:, None, None]
    load_rk = valid[:, None, None] & k_in[None, :, None]  # [ROWS, KP, 1]
    load_r = valid[:, None, None]  # [ROWS, 1, 1]
    write_rk = row_in[:, None, None] & k_in[None, :, None]
    keep_rk = valid[:, None, None] & k_in[None, :, None]
    g_row = ((ks.to(tl.int64) * N)[None, :, None] + rows64[:, None, None]) * V  # rows of the (K, N, V) grads
    cols = tl.arange(0, BV)[None, None, :]  # [1, 1, BV]
    scale_s = LOG2E * inv_temp
    neg_inf = float("-inf")

    # ---- pass 1: row statistics --------------------------------------------------------------------------------
    if ONE_BLOCK:
        cmask = cols < V
        s = tl.load(s_row + _columns(cols, 0, COL64) * s_sv, mask=load_rk & cmask,
                    other=neg_inf).to(tl.float32)
        m_s = tl.max(s, axis=2)  # [ROWS, KP]
        m_s = tl.where(m_s == neg_inf, 0.0, m_s)  # fully masked rows: keep exp() away from -inf - -inf
        xs = s - m_s[:, :, None]
        e1 = tl.exp2(xs * LOG2E)
        z1 = tl.sum(e1, axis=2)
        if TEMP_IS_ONE:
            eT = e1
            zT = z1
        else:
            eT = tl.exp2(xs * scale_s)
            zT = tl.sum(eT, axis=2)
        # Label smoothing covers the unmasked tokens only: the sum and count of the logits that are not −inf
        # (masked tokens; masked-off lanes, rows and students were loaded as −inf too).
        unmasked = s != neg_inf
        sum_s = tl.sum(tl.where(unmasked, s, 0.0), axis=2)
        n_unmasked = tl.sum(unmasked.to(tl.float32), axis=2)
        if HAS_KD:
            t = tl.load(t_row + _columns(cols, 0, COL64) * t_sv, mask=load_r & cmask,
                        other=neg_inf).to(tl.float32)
            m_t = tl.max(t, axis=2)  # [ROWS, 1]
            m_t = tl.where(m_t == neg_inf, 0.0, m_t)
            et = tl.exp2((t - m_t[:, :, None]) * scale_s)
            zt = tl.sum(et, axis=2)
            d = (t - m_t[:, :, None]) - xs
            a_acc = tl.sum(tl.where(et == 0.0, 0.0, et * d), axis=2)  # 0 · (−inf) = 0: zero teacher mass
    else:
        m_s = tl.full([ROWS, KP], neg_inf, tl.float32)
        z1 = tl.zeros([ROWS, KP], tl.float32)
        zT = tl.zeros([ROWS, KP], tl.float32)
        sum_s = tl.zeros([ROWS, KP], tl.float32)
        n_unmasked = tl.zeros([ROWS, KP], tl.float32)
        m_t = tl.full([ROWS, 1], neg_inf, tl.float32)
        zt = tl.zeros([ROWS, 1], tl.float32)
        a_acc = tl.zeros([ROWS, KP], tl.float32)
        prev_ref_s = tl.zeros([ROWS, KP], tl.float32)
        prev_ref_t = tl.zeros([ROWS, 1], tl.float32)
        for v0 in range(0, V, BV):
            cmask = (cols + v0) < V
            s = tl.load(s_row + _columns(cols, v0, COL64) * s_sv, mask=load_rk & cmask,
                        other=neg_inf).to(tl.float32)
            # m_s is the true running max (−inf until a finite logit is seen); exponents are taken against a
            # finite stand-in for it, and old sums are rescaled from the true old max, which is 0 · (nothing)
            # when nothing was accumulated yet.
            new_m_s = tl.maximum(m_s, tl.max(s, axis=2))
            ref_s = tl.where(new_m_s == neg_inf, 0.0, new_m_s)
            xs = s - ref_s[:, :, None]
            e1 = tl.exp2(xs * LOG2E)
            z1 = z1 * tl.exp2((m_s - ref_s) * LOG2E) + tl.sum(e1, axis=2)
            if TEMP_IS_ONE:
                zT = z1
            else:
                zT = zT * tl.exp2((m_s - ref_s) * scale_s) + tl.sum(tl.exp2(xs * scale_s), axis=2)
            unmasked = s != neg_inf  # see the one-block path
            sum_s += tl.sum(tl.where(unmasked, s, 0.0), axis=2)
            n_unmasked += tl.sum(unmasked.to(tl.float32), axis=2)
            if HAS_KD:
                t = tl.load(t_row + _columns(cols, v0, COL64) * t_sv, mask=load_r & cmask,
                            other=neg_inf).to(tl.float32)
                new_m_t = tl.maximum(m_t, tl.max(t, axis=2))
                ref_t = tl.where(new_m_t == neg_inf, 0.0, new_m_t)
                xt = t - ref_t[:, :, None]
                et = tl.exp2(xt * scale_s)
                # Old terms of A were measured against the old references: shift them by the change of
                # (ref_s − ref_t), then rescale their weights like Zt. Where Zt is still 0 there is nothing to shift.
                shift = (ref_s - prev_ref_s) - (ref_t - prev_ref_t)
                rescale_t = tl.exp2((m_t - ref_t) * scale_s)
                # Old terms whose weights underflow to 0 are dropped, as the one-block path drops them, also when
                # they summed to +inf (teacher mass on a masked token): never 0 · inf.
                a_acc = tl.where(rescale_t == 0.0, 0.0, rescale_t * (a_acc + tl.where(zt > 0.0, zt * shift, 0.0)))
                a_acc += tl.sum(tl.where(et == 0.0, 0.0, et * (xt - xs)), axis=2)
                zt = zt * rescale_t + tl.sum(et, axis=2)
                m_t = new_m_t
                prev_ref_t = ref_t
            m_s = new_m_s
            prev_ref_s = ref_s
        m_s = tl.where(m_s == neg_inf, 0.0, m_s)
        m_t = tl.where(m_t == neg_inf, 0.0, m_t)

    # ---- per-row loss ------------------------------------------------------------------------------------------
    loss = tl.zeros([ROWS, KP], tl.float32)
    log_z1 = tl.log(z1)
    if HAS_CE:
        safe_y = tl.where(valid & (y >= 0) & (y < V), y, 0)
        s_y = tl.load(s_ptr + (r0 * s_s0 + r1 * s_s1)[:, None] + (ks.to(tl.int64) * s_sk)[None, :]
                      + (safe_y * s_sv)[:, None], mask=valid[:, None] & k_in[None, :], other=0.0).to(tl.float32)
        ce = (1.0 - label_smoothing) * (m_s - s_y + log_z1)
        ce += label_smoothing * (m_s - sum_s / n_unmasked + log_z1)
        loss += ce_weight * ce
    if HAS_KD:
        inv_zt = 1.0 / zt
        kl = a_acc * inv_zt * inv_temp + tl.log(zT) - tl.log(zt)
        loss += kd_weight * kl
    loss = tl.where(bad_label[:, None], float("nan"), loss)
    loss = tl.where(valid[:, None] & k_in[None, :], loss, 0.0)
    if SINGLE_PROGRAM:
        total += tl.sum(loss, axis=0)
    else:
        offs = ks.to(tl.int64)[None, :] * N + rows64[:, None]
        tl.store(loss_ptr + offs, loss * grad_scale, mask=row_in[:, None] & k_in[None, :])

    # ---- pass 2: gradients (reverse block order) ---------------------------------------------------------------
    if GRAD_S or GRAD_T:
        inv_z1 = (1.0 / z1)[:, :, None]
        inv_zT = (1.0 / zT)[:, :, None]
        ms3 = m_s[:, :, None]
        nan_rows = bad_label[:, None, None]
        if HAS_KD:
            inv_zt3 = inv_zt[:, :, None]
            mt3 = m_t[:, :, None]
            a_over_zt = (a_acc * inv_zt)[:, :, None]
        kd_s = kd_weight * inv_temp * grad_scale
        kd_t = kd_weight * inv_temp * inv_temp * grad_scale
        ce_s = ce_weight * grad_scale
        smooth = (label_smoothing / n_unmasked)[:, :, None]  # ε/|U| on each unmasked token, 0 on masked ones
        n_blocks = tl.cdiv(V, BV)
        for i in range(0, n_blocks):
            v0 = (n_blocks - 1 - i) * BV
            cmask = (cols + v0) < V
            if ONE_BLOCK:
                s_blk = s
            else:
                s_blk = tl.load(s_row + _columns(cols, v0, COL64) * s_sv, mask=load_rk & cmask,
                                other=neg_inf).to(tl.float32)
            xs = s_blk - ms3
            g = tl.zeros([ROWS, KP, BV], tl.float32)
            if HAS_CE:
                e1b = tl.exp2(xs * LOG2E)
                hit = (cols + v0) == y[:, None, None]
                g += ce_s * (e1b * inv_z1 - tl.where(hit, 1.0 - label_smoothing, 0.0)
                             - tl.where(s_blk != neg_inf, smooth, 0.0))
            if HAS_KD:
                if ONE_BLOCK:
                    t_blk = t
                else:
                    t_blk = tl.load(t_row + _columns(cols, v0, COL64) * t_sv, mask=load_r & cmask,
                                    other=neg_inf).to(tl.float32)
                xt = t_blk - mt3
                p_t = tl.exp2(xt * scale_s) * inv_zt3
                if TEMP_IS_ONE and HAS_CE:
                    q_s = e1b * inv_zT
                else:
                    q_s = tl.exp2(xs * scale_s) * inv_zT
                g += kd_s * (q_s - p_t)
                if GRAD_T:
                    gt = kd_t * tl.where(p_t == 0.0, 0.0, p_t * ((xt - xs) - a_over_zt))
                    gt = tl.where(nan_rows, float("nan"), gt)
                    gt = tl.where(keep_rk, gt, 0.0)
                    tl.store(grad_t_ptr + g_row + cols + v0, gt.to(grad_t_ptr.dtype.element_ty),
                             mask=write_rk & cmask)
            if GRAD_S:
                g = tl.where(nan_rows, float("nan"), g)
                g = tl.where(keep_rk, g, 0.0)
                tl.store(grad_s_ptr + g_row + cols + v0, g.to(grad_s_ptr.dtype.element_ty), mask=write_rk & cmask)
    return total


@triton.jit
def _kd_loss_fwd_kernel(
    loss_ptr,  # fp32: (K, N) per-row losses (divided by the count for a mean), or (K,) reduced in SINGLE_PROGRAM
    grad_s_ptr,  # (K, N, V) contiguous, student dtype: ∂loss/∂student (unscaled by grad_output)
    grad_t_ptr,  # (K, N, V) contiguous, teacher dtype: ∂loss_k/∂teacher for each student k
    s_ptr, s_sk, s_s0, s_s1, s_sv,  # student logits viewed as (K, R0, R1, V), any strides
    t_ptr, t_s0, t_s1, t_sv,  # teacher logits viewed as (R0, R1, V), any strides
    y_ptr, y_stride,  # (N,) integer labels (any integer dtype)
    K, N, R1, V,  # students, rows (= R0 · R1), inner row count, vocabulary
    inv_temp,  # 1 / T
    ce_weight,  # 1 − α (0 without a target)
    kd_weight,  # α · T² (α · 1 with t_squared=False; T² or 1 without a target)
    label_smoothing,  # ε
    ignore_index,
    count_ptr,  # fp32 scalar: number of non-ignored rows (read when MEAN and not SINGLE_PROGRAM)
    HAS_TARGET: tl.constexpr, HAS_CE: tl.constexpr, HAS_KD: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, TEMP_IS_ONE: tl.constexpr,
    SINGLE_PROGRAM: tl.constexpr,  # one program walks all rows and writes the reduced loss
    MEAN: tl.constexpr,  # gradients are divided by the number of non-ignored rows (and, SINGLE_PROGRAM, the loss)
    ROWS: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, ONE_BLOCK: tl.constexpr,
    COUNT_BLOCK: tl.constexpr,  # labels read per step when counting valid rows
    COL64: tl.constexpr,  # column offsets in int64 (a column stride × V past 2^31)
):
    if SINGLE_PROGRAM:
        grad_scale = 1.0
        if MEAN:
            # Count the non-ignored rows first, so the gradient can be written already divided by the count.
            count = 0.0
            if HAS_TARGET:
                for n0 in range(0, N, COUNT_BLOCK):
                    offs = n0 + tl.arange(0, COUNT_BLOCK)
                    lab = tl.load(y_ptr + offs.to(tl.int64) * y_stride, mask=offs < N, other=ignore_index)
                    count += tl.sum(((offs < N) & (lab != ignore_index)).to(tl.float32), axis=0)
            else:
                count = N * 1.0
            grad_scale = 1.0 / tl.maximum(count, 1.0)
        total = tl.zeros([KP], tl.float32)
        for row_start in range(0, N, ROWS):
            total = _kd_tile(
                row_start, total, loss_ptr, grad_s_ptr, grad_t_ptr, s_ptr, s_sk, s_s0, s_s1, s_sv, t_ptr, t_s0,
                t_s1, t_sv, y_ptr, y_stride, K, N, R1, V, inv_temp, ce_weight, kd_weight, label_smoothing,
                ignore_index, grad_scale, HAS_TARGET, HAS_CE, HAS_KD, GRAD_S, GRAD_T, TEMP_IS_ONE, ROWS, KP, BV,
                ONE_BLOCK, COL64, SINGLE_PROGRAM)
        ks = tl.arange(0, KP)
        tl.store(loss_ptr + ks, total * grad_scale, mask=ks < K)
    else:
        grad_scale = 1.0
        if MEAN:
            grad_scale = 1.0 / tl.maximum(tl.load(count_ptr), 1.0)
        _kd_tile(
            tl.program_id(0) * ROWS, tl.zeros([KP], tl.float32), loss_ptr, grad_s_ptr, grad_t_ptr, s_ptr, s_sk,
            s_s0, s_s1, s_sv, t_ptr, t_s0, t_s1, t_sv, y_ptr, y_stride, K, N, R1, V, inv_temp, ce_weight, kd_weight,
            label_smoothing, ignore_index, grad_scale, HAS_TARGET, HAS_CE, HAS_KD, GRAD_S, GRAD_T, TEMP_IS_ONE,
            ROWS, KP, BV, ONE_BLOCK, COL64, SINGLE_PROGRAM)
