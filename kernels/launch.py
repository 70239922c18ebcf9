"""Block-size and warp heuristics for the Triton kernels, kept in one place."""

import triton

# Largest column block a program streams through (elements). 4–16K keeps the exponentials overlapped with the
# loads instead of spilling registers (see ../shared/docs/fused-loss-landscape.md §8). Tests monkeypatch it to
# force the multi-block online path on small vocabularies.
MAX_BLOCK_V = 8192
# Elements a program holds per tile: rows × students × columns.
TILE_ELEMENTS = 8192
# Problems up to this many student elements, with a reduced loss, run as ONE program that also reduces the
# loss: a single launch for the forward, at the price of no parallelism (fine at this size, where launch
# latency dominates).
SINGLE_PROGRAM_MAX_ELEMENTS = 1 << 18


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def kd_loss_config(num_rows: int, num_students: int, vocab: int, reduced: bool) -> dict:
    """Launch configuration for ``_kd_loss_fwd_kernel``.

    Args:
        num_rows: N, teacher rows. num_students: K. vocab: V.
        reduced: the caller wants a mean/sum, so the single-program path is allowed.

    Returns:
        kwargs for the kernel's constexprs plus ``grid`` and ``num_warps``.
    """
    kp = _pow2(num_students)
    block_v = min(_pow2(vocab), max(MAX_BLOCK_V // kp, 16))
    one_block = vocab <= block_v
    rows = 1
    if one_block:
        rows = max(1, min(TILE_ELEMENTS // (kp * block_v), _pow2(num_rows)))
    tile = rows * kp * block_v
    num_warps = 4 if tile <= 2048 else (8 if tile <= 8192 else 16)
    single = reduced and one_block and num_students * num_rows * vocab <= SINGLE_PROGRAM_MAX_ELEMENTS
    grid = (1,) if single else (triton.cdiv(num_rows, rows),)
    return dict(ROWS=rows, KP=kp, BV=block_v, ONE_BLOCK=one_block, SINGLE_PROGRAM=single,
                COUNT_BLOCK=min(_pow2(num_rows), 4096), grid=grid, num_warps=num_warps)
