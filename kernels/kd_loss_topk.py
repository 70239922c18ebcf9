"""Fused KD + CE Triton kernel against a sparse (top-k) teacher. Installed as ``spacedkd_fast.kernels.kd_loss_topk``.

The math of ``spacedkd_fast/loss/sparse.py``, per row (s the student's full row, ids/v the teacher's k entries)::

    pass 1 (online over column blocks, one read of s):
        m_s = max s    Z1 = Σ exp(s − m_s)    ZT = Σ exp((s − m_s)/T)    Σ_U s, |U|   (CE and label smoothing)
    teacher (k entries, one load; the student gathered at the k ids):
        p = softmax(v/T) over the k entries               ("renormalize")
        p = softmax([v, log P_tail]/T), P_tail = 1 − Σ exp(v)   ("bucket"; q_tail = 1 − Σ_K q)
        KL = Σ_K p (log p − log q) [+ p_tail (log p_tail − log q_tail)]
    pass 2 (reverse block order): the dense gradient
        (1−α)·(softmax(s) − (1−ε)·onehot(y) − ε·1_U/|U|) + (α·c/T)·softmax(s/T)·f,   f = 1 − p_tail/q_tail (or 1)
    then, after a barrier, the k teacher ids are overwritten with their full value (α·c/T)·(q − p) + the CE part.

The kernel reads only the k teacher entries. Under "bucket" the student's residual mass is ``ZT − Σ_K exp(...)``
(float32 cancellation when it is below ~1e-6 of the row; the C++ kernel sums it directly). Rows whose label or
teacher ids are out of range get a NaN loss and gradient (the host checks them on CPU, and on CUDA with
``SPACEDKD_CHECK_TARGETS=1``); duplicated ids are not detected here.
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _kd_loss_topk_kernel(
    loss_ptr,  # fp32 (N,): per-row losses, divided by the count for a mean
    grad_ptr,  # (N, V) contiguous, student dtype: ∂loss/∂student (unscaled by grad_output)
    s_ptr, s_sn, s_sv,  # student logits (N, V), any strides
    i_ptr, v_ptr,  # teacher ids (N, K) int32/int64 and values (N, K), contiguous
    y_ptr, y_stride,  # (N,) labels
    N, V, K,
    inv_temp, ce_weight, kd_weight, label_smoothing, ignore_index,
    count_ptr,  # fp32 scalar: non-ignored rows (read when MEAN)
    HAS_TARGET: tl.constexpr, HAS_CE: tl.constexpr, HAS_KD: tl.constexpr, GRAD_S: tl.constexpr,
    TEMP_IS_ONE: tl.constexpr, MEAN: tl.constexpr, BUCKET: tl.constexpr,
    ROWS: tl.constexpr, BV: tl.constexpr, KB: tl.constexpr, ONE_BLOCK: tl.constexpr, COL64: tl.constexpr,
):
    grad_scale = 1.0
    if MEAN:
        grad_scale = 1.0 / tl.maximum(tl.load(count_ptr), 1.0)
    neg_inf = float("-inf")
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_in = rows < N
    rows64 = rows.to(tl.int64)
    if HAS_TARGET:
        y = tl.load(y_ptr + rows64 * y_stride, mask=row_in, other=ignore_index).to(tl.int64)
        valid = row_in & (y != ignore_index)
        bad = valid & ((y < 0) | (y >= V))
    else:
        y = tl.zeros([ROWS], dtype=tl.int64)
        valid = row_in
        bad = tl.zeros([ROWS], dtype=tl.int1)

    # ---- the teacher's k entries and the student at those ids ------------------------------------------------
    kcols = tl.arange(0, KB)[None, :]
    kmask = valid[:, None] & (kcols < K)
    ids = tl.load(i_ptr + rows64[:, None] * K + kcols, mask=kmask, other=0).to(tl.int64)
    bad_id = kmask & ((ids < 0) | (ids >= V))
    bad = bad | (tl.sum(bad_id.to(tl.int32), axis=1) > 0)
    ids = tl.where(bad_id, 0, ids)
    vals = tl.load(v_ptr + rows64[:, None] * K + kcols, mask=kmask, other=neg_inf).to(tl.float32)
    s_row = s_ptr + rows64 * s_sn  # [ROWS]
    s_k = tl.load(s_row[:, None] + ids * s_sv, mask=kmask, other=neg_inf).to(tl.float32)

    # ---- pass 1: the student's statistics ----------------------------------------------------------------------
    cols = tl.arange(0, BV)[None, :]
    scale_t = LOG2E * inv_temp
    if ONE_BLOCK:
        cmask = cols < V
        c = cols
        if COL64:
            c = c.to(tl.int64)
        s = tl.load(s_row[:, None] + c * s_sv, mask=valid[:, None] & cmask, other=neg_inf).to(tl.float32)
        m_s = tl.max(s, axis=1)
        m_s = tl.where(m_s == neg_inf, 0.0, m_s)
        xs = s - m_s[:, None]
        z1 = tl.sum(tl.exp2(xs * LOG2E), axis=1)
        if TEMP_IS_ONE:
            zT = z1
        else:
            zT = tl.sum(tl.exp2(xs * scale_t), axis=1)
        unmasked = s != neg_inf
        sum_s = tl.sum(tl.where(unmasked, s, 0.0), axis=1)
        n_unmasked = tl.sum(unmasked.to(tl.float32), axis=1)
    else:
        m_s = tl.full([ROWS], neg_inf, tl.float32)
        z1 = tl.zeros([ROWS], tl.float32)
        zT = tl.zeros([ROWS], tl.float32)
        sum_s = tl.zeros([ROWS], tl.float32)
        n_unmasked = tl.zeros([ROWS], tl.float32)
        for v0 in range(0, V, BV):
            c = cols + v0
            if COL64:
                c = c.to(tl.int64)
            s = tl.load(s_row[:, None] + c * s_sv, mask=valid[:, None] & ((cols + v0) < V),
                        other=neg_inf).to(tl.float32)
            new_m = tl.maximum(m_s, tl.max(s, axis=1))
            ref = tl.where(new_m == neg_inf, 0.0, new_m)
            xs = s - ref[:, None]
            z1 = z1 * tl.exp2((m_s - ref) * LOG2E) + tl.sum(tl.exp2(xs * LOG2E), axis=1)
            if TEMP_IS_ONE:
                zT = z1
            else:
                zT = zT * tl.exp2((m_s - ref) * scale_t) + tl.sum(tl.exp2(xs * scale_t), axis=1)
            unmasked = s != neg_inf
            sum_s += tl.sum(tl.where(unmasked, s, 0.0), axis=1)
            n_unmasked += tl.sum(unmasked.to(tl.float32), axis=1)
            m_s = new_m
        m_s = tl.where(m_s == neg_inf, 0.0, m_s)
    log_z1 = tl.log(z1)
    log_zT = tl.log(zT)

    # ---- the loss ----------------------------------------------------------------------------------------------
    loss = tl.zeros([ROWS], tl.float32)
    if HAS_CE:
        safe_y = tl.where(valid & ~bad, y, 0)
        s_y = tl.load(s_row + safe_y * s_sv, mask=valid, other=0.0).to(tl.float32)
        ce = (1.0 - label_smoothing) * (m_s - s_y + log_z1)
        ce += label_smoothing * (m_s - sum_s / n_unmasked + log_z1)
        loss += ce_weight * ce
    tail_factor = tl.full([ROWS], 1.0, tl.float32)
    p = tl.zeros([ROWS, KB], tl.float32)
    if HAS_KD:
        if BUCKET:
            # P_tail = 1 − Σ exp(v) at T = 1 = −expm1(lse(v)) (a short series near 0, where 1 − exp cancels).
            mv = tl.max(vals, axis=1)
            mv_safe = tl.where(mv == neg_inf, 0.0, mv)
            lse = mv_safe + tl.log(tl.sum(tl.exp2((vals - mv_safe[:, None]) * LOG2E), axis=1))
            small = tl.abs(lse) < 1e-2
            series = -(lse + lse * lse * 0.5 + lse * lse * lse * (1.0 / 6.0))
            tail = tl.where(lse < 0.0, tl.where(small, series, 1.0 - tl.exp2(lse * LOG2E)), 0.0)
            u_tail = tl.where(tail > 0.0, tl.log(tail), neg_inf)
            mt = tl.maximum(tl.max(vals, axis=1), u_tail)
        else:
            mt = tl.max(vals, axis=1)
        mt = tl.where(mt == neg_inf, 0.0, mt)
        xt = vals - mt[:, None]
        et = tl.exp2(xt * scale_t)
        zt = tl.sum(et, axis=1)
        if BUCKET:
            e_tail = tl.exp2((u_tail - mt) * scale_t)
            zt += e_tail
        log_zt = tl.log(zt)
        p = et / zt[:, None]
        log_p = xt * inv_temp - log_zt[:, None]
        log_q = (s_k - m_s[:, None]) * inv_temp - log_zT[:, None]
        kl = tl.sum(tl.where(p == 0.0, 0.0, p * (log_p - log_q)), axis=1)
        if BUCKET:
            p_tail = e_tail / zt
            q_in = tl.sum(tl.exp2((s_k - m_s[:, None]) * scale_t), axis=1)
            zo = tl.maximum(zT - q_in, 0.0)  # the student's residual mass (unnormalized)
            q_tail = zo / zT
            log_q_tail = tl.log(zo) - log_zT
            log_p_tail = (u_tail - mt) * inv_temp - log_zt
            kl += tl.where(p_tail == 0.0, 0.0, p_tail * (log_p_tail - log_q_tail))
            tail_factor = tl.where(q_tail > 0.0, 1.0 - p_tail / q_tail, 1.0)
        loss += kd_weight * kl
    loss = tl.where(bad, float("nan"), loss)
    loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + rows64, loss * grad_scale, mask=row_in)

    # ---- pass 2: the dense gradient, then the k teacher ids --------------------------------------------------
    if GRAD_S:
        ce_s = ce_weight * grad_scale
        kd_s = kd_weight * inv_temp * grad_scale
        inv_z1 = 1.0 / z1
        inv_zT = 1.0 / zT
        smooth = label_smoothing / n_unmasked
        kd_dense = (kd_s * tail_factor * inv_zT)[:, None]
        keep = valid[:, None]
        nan_rows = bad[:, None]
        g_row = rows64[:, None] * V
        n_blocks = tl.cdiv(V, BV)
        for i in range(0, n_blocks):
            v0 = (n_blocks - 1 - i) * BV
            cmask = (cols + v0) < V
            if ONE_BLOCK:
                s_blk = s
            else:
                c = cols + v0
                if COL64:
                    c = c.to(tl.int64)
                s_blk = tl.load(s_row[:, None] + c * s_sv, mask=valid[:, None] & cmask,
                                other=neg_inf).to(tl.float32)
            xs = s_blk - m_s[:, None]
            g = tl.zeros([ROWS, BV], tl.float32)
            if HAS_CE:
                hit = (cols + v0) == y[:, None]
                g += ce_s * (tl.exp2(xs * LOG2E) * inv_z1[:, None] - tl.where(hit, 1.0 - label_smoothing, 0.0)
                             - tl.where(s_blk != neg_inf, smooth[:, None], 0.0))
            if HAS_KD:
                g += kd_dense * tl.exp2(xs * scale_t)
            g = tl.where(nan_rows, float("nan"), g)
            g = tl.where(keep, g, 0.0)
            tl.store(grad_ptr + g_row + cols + v0, g.to(grad_ptr.dtype.element_ty), mask=row_in[:, None] & cmask)
        if HAS_KD:
            tl.debug_barrier()  # the dense stores above land first; the k ids are overwritten below
            xk = s_k - m_s[:, None]
            gk = kd_s * (tl.exp2(xk * scale_t) * inv_zT[:, None] - p)
            if HAS_CE:
                hit_k = ids == y[:, None]
                gk += ce_s * (tl.exp2(xk * LOG2E) * inv_z1[:, None] - tl.where(hit_k, 1.0 - label_smoothing, 0.0)
                              - tl.where(s_k != neg_inf, smooth[:, None], 0.0))
            tl.store(grad_ptr + g_row + ids, gk.to(grad_ptr.dtype.element_ty), mask=kmask & ~nan_rows)
