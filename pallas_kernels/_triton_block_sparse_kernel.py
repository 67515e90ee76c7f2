"""Triton kernel of the block-sparse attention forward (pallas_kernels.triton_block_sparse).

Imports triton at module level: import it only where triton is installed (triton_block_sparse
does so lazily). A module of its own so that the @triton.jit functions resolve each other as
module globals, as Triton's compiler and interpreter require.
"""

import triton
import triton.language as tl

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

@triton.jit
def _attend(acc, l_i, m_i, q, k_base, v_base, cols_row, start, end, offs_m, offs_n, offs_d,
            stride_kt, QK_SCALE: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
            IEEE: tl.constexpr):
  """Online softmax over list entries [start, end) of one query block (base-2 exponentials).

  MASKED applies the causal mask element-wise (the only masked block is the diagonal, as the
  sequence fills whole blocks).
  """
  for j in range(start, end):
    kb = tl.load(cols_row + j)
    offs_k = kb * BLOCK + offs_n
    kt = tl.load(k_base + offs_k[None, :] * stride_kt + offs_d[:, None])  # [E, BLOCK]
    if IEEE:
      s = tl.dot(q, kt, input_precision="ieee")
    else:
      s = tl.dot(q, kt)
    s = s * QK_SCALE
    if MASKED:
      s = tl.where(offs_m[:, None] >= offs_k[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_k[:, None] * stride_kt + offs_d[None, :])  # [BLOCK, E]
    if IEEE:
      pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
      pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    m_i = m_new
  return acc, l_i, m_i

@triton.jit
def block_sparse_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cols_ptr, count_ptr, nfull_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_lb, stride_lh,
    stride_cl, stride_cr, stride_nl,
    o_ptr, lse_ptr,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, LAYOUT_GROUP: tl.constexpr,
    QK_SCALE: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
  """One program per (query block, batch * head).

  q / o [B, T, H, E] (o shares q's strides), k / v [B, T, K, E], cols [L, n, W], count /
  nfull [L, n] int32, lse [B, H, T] float32 (natural log). Head h reads K/V head h // GROUP
  and layout head h // LAYOUT_GROUP.
  """
  qb = tl.num_programs(0) - 1 - tl.program_id(0)  # heavy (late) query blocks launch first
  bh = tl.program_id(1)
  b = (bh // NUM_HEADS).to(tl.int64)
  h = bh % NUM_HEADS
  kh = h // GROUP
  lh = h // LAYOUT_GROUP
  offs_m = qb * BLOCK + tl.arange(0, BLOCK)
  offs_n = tl.arange(0, BLOCK)
  offs_d = tl.arange(0, HEAD_DIM)

  q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
  q = tl.load(q_ptr + q_off)
  k_base = k_ptr + b * stride_kb + kh * stride_kh
  v_base = v_ptr + b * stride_kb + kh * stride_kh
  cols_row = cols_ptr + lh * stride_cl + qb * stride_cr
  nfull = tl.load(nfull_ptr + lh * stride_nl + qb)
  count = tl.load(count_ptr + lh * stride_nl + qb)

  acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
  l_i = tl.zeros([BLOCK], dtype=tl.float32)
  m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)  # finite: exp2(m_i - m_new) never NaN
  acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, cols_row, 0, nfull, offs_m,
                          offs_n, offs_d, stride_kt, QK_SCALE, BLOCK, False, IEEE)
  acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, cols_row, nfull, count, offs_m,
                          offs_n, offs_d, stride_kt, QK_SCALE, BLOCK, True, IEEE)

  empty = l_i == 0.0  # rows that attend no key: output 0, LSE -inf
  l_safe = tl.where(empty, 1.0, l_i)
  o = acc / l_safe[:, None]
  tl.store(o_ptr + q_off, o.to(o_ptr.dtype.element_ty))
  lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
  tl.store(lse_ptr + b * stride_lb + h * stride_lh + offs_m, lse)
