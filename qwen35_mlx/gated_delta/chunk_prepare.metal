// What chunked_scan.metal needs of a chunk besides the state, for all chunks in parallel: one
// threadgroup per (batch, value head) x chunk of C tokens (docs/ARCHITECTURE.md §8; the split
// of flash-linear-attention's chunk_scaled_dot_kkt / solve_tril from its state pass):
//   gc  cumulative log decay within the chunk                            [C]
//   A   beta_i exp(gc_i - gc_j) k_i.k_j for j < i  (threadgroup only)   [C, C]
//   W = (I + A)^-1 diag(beta): the chunk's new values are X = W R,      [C, C]
//       R_i = v_i - exp(gc_i) S k_i
//   P   exp(gc_i - gc_j) q_i.k_j for j <= i                             [C, C]
// A and P tile by tile over the simdgroups as 8 x 8 simdgroup products, the diagonal blocks
// of (I + A) inverted as power series (chunked_scan.h); then W block column by block column,
// each simdgroup for its own, by forward substitution over 8-token blocks:
//   W_ib,jb = -(I + A_ib,ib)^-1 sum_{jb <= c < ib} A_ib,c W_c,jb.
// Tokens past T (the last chunk's padding) read as zeros with beta = 0 and g = 0: their rows
// and columns of W and P are zero. Blocks above the diagonal are written as zeros.
//
// Template: Dk key dim; Hv value heads; C chunk (multiple of 8); SG simdgroups.
// q     [B, T, Hv, Dk]        normalised, scaled by Dk^-1/2
// k     [B, T, Hv, Dk]        normalised
// g     [B, T, Hv]            log decay (<= 0)
// beta  [B, T, Hv]
// T     scalar int            tokens
// W     [B, Hv, NC, C, C]     float32, NC = ceil(T / C) chunks
// P     [B, Hv, NC, C, C]     float32
// gc    [B, Hv, NC, C]        float32, constant past T

constexpr int NT = 32 * SG;  // threads per threadgroup
constexpr int NB = C / 8;  // 8-token blocks per chunk
constexpr int LK = tile_stride(Dk);  // padded row strides
constexpr int LC = tile_stride(C);
const int n = threadgroup_position_in_grid.z;  // batch * Hv + value head
const int batch = n / Hv;
const int hv = n % Hv;
const int chunk = threadgroup_position_in_grid.y;
const int t0 = chunk * C;
const int live = T - t0 < C ? T - t0 : C;  // real tokens in this chunk
const int tid = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int sg = simdgroup_index_in_threadgroup;
const int er = tile_row(lane);  // (er, ec) and (er, ec + 1): this lane's elements of a tile
const int ec = tile_col(lane);
const size_t row0 = (size_t(n) * ((T + C - 1) / C) + chunk) * C;  // this chunk's rows of W, P, gc
device float* w_chunk = W + row0 * C;  // [C, C]
device float* p_chunk = P + row0 * C;

threadgroup float qs[C * LK];  // q of the chunk [C, Dk]
threadgroup float ks[C * LK];  // k of the chunk [C, Dk]
threadgroup float A[C * LC];  // -A below the diagonal blocks; (I + A_bb)^-1 on them
threadgroup float gc_c[C];
threadgroup float beta_c[C];

// Stage the chunk: q, k (zeros past T), cumulative decay, beta.
const size_t first = size_t(batch * T + t0) * Hv + hv;  // the chunk's first token, this head
stage_rows<C, Dk>(qs, LK, q + first * Dk, Hv * Dk, live, tid, NT);
stage_rows<C, Dk>(ks, LK, k + first * Dk, Hv * Dk, live, tid, NT);
for (int i = tid; i < C; i += NT) {
  float sum = 0.0f;
  for (int j = 0; j <= i && j < live; ++j) {
    sum += static_cast<float>(g[first + j * Hv]);
  }
  gc_c[i] = sum;
  gc[row0 + i] = sum;
  beta_c[i] = i < live ? static_cast<float>(beta[first + i * Hv]) : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// A and P, lower tiles (ib >= jb) over the simdgroups; masked before exp, so no exp of a
// positive difference. The owner of a diagonal tile inverts it there.
for (int tile = sg; tile < NB * (NB + 1) / 2; tile += SG) {
  int ib = 0;
  while ((ib + 1) * (ib + 2) / 2 <= tile) {
    ++ib;
  }
  const int jb = tile - ib * (ib + 1) / 2;
  tile8 kk = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  tile8 qk = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  MLX_MTL_PRAGMA_UNROLL
  for (int d = 0; d < Dk / 8; ++d) {
    const tile8 ki = load_tile(ks + 8 * ib * LK + 8 * d, LK, false, lane);
    const tile8 qi = load_tile(qs + 8 * ib * LK + 8 * d, LK, false, lane);
    const tile8 kj = load_tile(ks + 8 * jb * LK + 8 * d, LK, true, lane);
    simdgroup_multiply_accumulate(kk, ki, kj, kk);
    simdgroup_multiply_accumulate(qk, qi, kj, qk);
  }
  for (int j = 0; j < 2; ++j) {
    const int row = 8 * ib + er;
    const int col = 8 * jb + ec + j;
    const float decay = col <= row ? metal::exp(gc_c[row] - gc_c[col]) : 0.0f;
    kk.thread_elements()[j] = col < row ? -beta_c[row] * decay * kk.thread_elements()[j] : 0.0f;
    qk.thread_elements()[j] *= decay;
  }
  if (ib == jb) {
    kk = unit_lower_inverse8(kk, lane);
  }
  store_tile(kk, A + 8 * ib * LC + 8 * jb, LC, false, lane);
  simdgroup_store(qk, p_chunk + 8 * ib * C + 8 * jb, C);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// W down block column jb, kept unscaled in registers for the blocks below; stored with its
// columns scaled by beta. Blocks above the diagonal: zeros, in W and P.
for (int jb = sg; jb < NB; jb += SG) {
  tile8 w[NB];
  MLX_MTL_PRAGMA_UNROLL
  for (int ib = 0; ib < NB; ++ib) {
    tile8 block = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    if (ib == jb) {
      block = load_tile(A + 8 * ib * LC + 8 * ib, LC, false, lane);
    } else if (ib > jb) {
      tile8 sum = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);  // sum_c -A_ib,c W_c,jb
      MLX_MTL_PRAGMA_UNROLL
      for (int c = 0; c < ib; ++c) {
        if (c >= jb) {
          const tile8 a = load_tile(A + 8 * ib * LC + 8 * c, LC, false, lane);
          simdgroup_multiply_accumulate(sum, a, w[c], sum);
        }
      }
      const tile8 inverse = load_tile(A + 8 * ib * LC + 8 * ib, LC, false, lane);
      simdgroup_multiply(block, inverse, sum);
    } else {
      simdgroup_store(block, p_chunk + 8 * ib * C + 8 * jb, C);
    }
    w[ib] = block;
    for (int j = 0; j < 2; ++j) {
      block.thread_elements()[j] *= beta_c[8 * jb + ec + j];
    }
    simdgroup_store(block, w_chunk + 8 * ib * C + 8 * jb, C);
  }
}
