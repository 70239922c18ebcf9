"""Block-size and warp heuristics for the Triton kernels, kept in one place.

Every configuration these heuristics can choose is compiled for sm_90a (and sm_80) by the compile gate
(``python -m spacedkd_fast.kernels.compile_gate``, run by the test suite), which fails on any spilled register.
The rules that keep them spill-free:

* A program holds a tile of ``ROWS × KP × BV`` elements. The kernel keeps about eight tile-shaped fp32 values
  live at once (both logits, their shifted copies and exponentials, the gradient), so a thread may own only a few
  tile elements (``ELEMENTS_PER_THREAD``); the warp count follows from the tile size.
* Rows that fit in one block are batched ROWS to a program, but never so many that the grid gets fewer than
  ``MIN_PROGRAMS`` programs when the problem has the rows for it: a GPU has 100+ SMs to fill.
* Wider rows stream through ``MAX_BLOCK_V``-element column blocks (online softmax statistics, then the gradient).
* A reduced loss on a *tiny* problem runs as one program that also reduces the loss (one launch, no follow-up
  sum). One program uses one SM, so this is only worth it where launch latency dominates; the limit is a
  conservative 16K elements until a GPU measurement sets the crossover.
"""

import triton

# Largest column block a program streams through (elements). Tests monkeypatch it to force the multi-block online
# path on small vocabularies.
MAX_BLOCK_V = 2048
# Tile elements per thread: 8 compiles spill-free over the gate's grid; 16 spilled (one-block tiles keep the rows
# in registers between the statistics and the gradient pass, with each row's statistics beside them).
ELEMENTS_PER_THREAD = 8
MAX_WARPS = 8
# Most elements a program holds (ROWS × KP × BV).
TILE_ELEMENTS = ELEMENTS_PER_THREAD * 32 * MAX_WARPS
# Rows per program shrink until the grid has at least this many programs (or one row per program).
MIN_PROGRAMS = 128
# At most this many rows in a tile: each row's statistics (max, sums, label) sit in registers beside the tile.
MAX_ROWS = 64
# Problems up to this many student elements, with a reduced loss, run as ONE program that also reduces the loss.
SINGLE_PROGRAM_MAX_ELEMENTS = 1 << 14
# ptxas, left to itself, aims some kernels at a register count below what they need (48, 64, 128: occupancy
# steps) and spills a value or two to get there. Granting the whole register file (.maxnreg 255, what 8 warps can
# have) removes those spills on sm_80 and sm_90a alike; every kernel here then stays far below it (gate table).
MAX_REGISTERS = 255
# Column offsets are computed in int64 when the largest one would not fit in int32.
INT32_MAX = 2**31 - 1


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _pow2_floor(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n.bit_length() - 1)


def _warps_for(tile: int) -> int:
    return max(1, min(MAX_WARPS, tile // (32 * ELEMENTS_PER_THREAD)))


def kd_loss_config(num_rows: int, num_students: int, vocab: int, reduced: bool, column_stride: int = 1) -> dict:
    """Launch configuration for ``_kd_loss_fwd_kernel``.

    Args:
        num_rows: N, teacher rows. num_students: K. vocab: V.
        reduced: the caller wants a mean/sum, so the single-program path is allowed.
        column_stride: the largest column stride (in elements) of student and teacher; decides whether column
            offsets need 64-bit arithmetic.

    Returns:
        kwargs for the kernel's constexprs plus ``grid`` and the compile options ``num_warps`` and ``maxnreg``.
    """
    kp = _pow2(num_students)
    block_v = min(_pow2(vocab), max(MAX_BLOCK_V // kp, 16))
    one_block = vocab <= block_v
    single = (reduced and one_block and num_students * num_rows * vocab <= SINGLE_PROGRAM_MAX_ELEMENTS)
    rows = 1
    if one_block:
        rows_fit = max(1, min(MAX_ROWS, TILE_ELEMENTS // (kp * block_v)))
        if single:
            rows = min(rows_fit, _pow2(num_rows))
        else:  # as many rows as fit, but keep MIN_PROGRAMS programs when there are rows enough
            rows = min(rows_fit, _pow2_floor(triton.cdiv(num_rows, MIN_PROGRAMS)))
    num_warps = _warps_for(rows * kp * block_v)
    grid = (1,) if single else (triton.cdiv(num_rows, rows),)
    col64 = (max(vocab, 1) - 1) * max(abs(int(column_stride)), 1) > INT32_MAX
    return dict(ROWS=rows, KP=kp, BV=block_v, ONE_BLOCK=one_block, SINGLE_PROGRAM=single,
                COUNT_BLOCK=min(_pow2(num_rows), 1024) if single else 16, COL64=col64, grid=grid, num_warps=num_warps,
                maxnreg=MAX_REGISTERS)


def kd_loss_topk_config(num_rows: int, vocab: int, k: int, column_stride: int = 1) -> dict:
    """Launch configuration for ``_kd_loss_topk_kernel``: ROWS rows × BV columns per program, the k teacher
    entries as a ``[ROWS, KB]`` block beside them (KB = k rounded up to a power of 2, ≤ 256)."""
    kb = _pow2(k)
    block_v = min(_pow2(vocab), MAX_BLOCK_V)
    one_block = vocab <= block_v
    rows = 1
    # The k entries (ids, values, the student at the ids, p) stay live beside the column block: both count.
    if one_block:
        rows_fit = max(1, min(MAX_ROWS, _pow2_floor(TILE_ELEMENTS // (block_v + kb))))
        rows = min(rows_fit, _pow2_floor(triton.cdiv(num_rows, MIN_PROGRAMS)))
    num_warps = _warps_for(_pow2(rows * (block_v + kb)))
    col64 = (max(vocab, 1) - 1) * max(abs(int(column_stride)), 1) > INT32_MAX
    return dict(ROWS=rows, BV=block_v, KB=kb, ONE_BLOCK=one_block, COL64=col64,
                grid=(triton.cdiv(num_rows, rows),), num_warps=num_warps, maxnreg=MAX_REGISTERS)
