// Chunked gated delta rule for prefill: the WY/UT form of chunked.py, one kernel for all chunks.
// Within a chunk of C tokens the recurrence is solved in parallel; only the state crosses chunks.
// The value columns of the state evolve independently, so a threadgroup owns BV = 8 * SG of them
// (grid y) for one (batch, value head) (grid z), and each simdgroup keeps its 8 state rows
// (value dims) x Dk in registers as simdgroup matrices. Everything a simdgroup computes is
// transposed, value dim first, so that the state is used in its stored [Dv, Dk] layout:
//   gc      cumulative log decay within the chunk              [C]
//   A       beta_i exp(gc_i - gc_j) k_i.k_j for j < i         [C, C]
//   X^T     (beta (v - exp(gc) S k))^T solved by (I + A)        [BV, C]  new values
//   out^T = exp(gc) S q^T + X^T P^T,  P_ij = exp(gc_i - gc_j) q_i.k_j for j <= i
//   S     = exp(gc_last) S + (X^T exp(gc_last - gc)) k
// All products are 8 x 8 simdgroup matrix products (docs/ARCHITECTURE.md §8): A and P tile by
// tile over the simdgroups, (I + A) X = R block by block, each simdgroup for its own columns,
// with the diagonal blocks inverted as power series (chunked_scan.h). X^T and out^T stay in
// registers. Threadgroup arrays are token-major with rows padded to 8 (mod 32) words, and their
// tiles move through load_tile / store_tile, whose lane-dependent order puts each step's 32
// lanes in distinct banks (chunked_scan.h); the staging writes (lanes along a row) are
// conflict-free at any stride.
// Tokens past T (the last chunk's padding) read as zeros with beta = 0 and g = 0: no effect.
//
// Template: Dk, Dv head dims; Hv value heads; C chunk (multiple of 8); SG simdgroups.
// q         [B, T, Hv, Dk]   normalised, scaled by Dk^-1/2
// k         [B, T, Hv, Dk]   normalised
// v         [B, T, Hv, Dv]
// g         [B, T, Hv]       log decay (<= 0)
// beta      [B, T, Hv]
// state_in  [B, Hv, Dv, Dk]  float32
// T         scalar int       tokens
// out       [B, T, Hv, Dv]   float32
// state_out [B, Hv, Dv, Dk]  float32

constexpr int BV = 8 * SG;  // value columns of this threadgroup
constexpr int NT = 32 * SG;  // threads per threadgroup
constexpr int NB = C / 8;  // 8-token blocks per chunk
constexpr int LK = tile_stride(Dk);  // padded row strides
constexpr int LC = tile_stride(C);
constexpr int LX = tile_stride(BV);
const int n = threadgroup_position_in_grid.z;  // batch * Hv + value head
const int batch = n / Hv;
const int hv = n % Hv;
const int col0 = threadgroup_position_in_grid.y * BV;  // first value column
const int tid = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int sg = simdgroup_index_in_threadgroup;
const int row0 = 8 * sg;  // this simdgroup's rows within BV
const int er = tile_row(lane);  // (er, ec) and (er, ec + 1): this lane's elements of a tile
const int ec = tile_col(lane);

threadgroup float qs[C * LK];  // q of the chunk [C, Dk]
threadgroup float ks[C * LK];  // k of the chunk [C, Dk]
threadgroup float A[C * LC];  // -A below the diagonal; (I + A_bb)^-1 on the diagonal blocks
threadgroup float P[C * LC];  // P on and below the diagonal
threadgroup float XO[2 * C * LX];  // per chunk parity: v of the chunk, then out [C, BV]
threadgroup float gc[C];
threadgroup float beta_c[C];

tile8 S[Dk / 8];  // this simdgroup's 8 x Dk slice of the state, in 8 x 8 tiles
const size_t state_rows = (size_t(n) * Dv + col0 + row0) * Dk;
MLX_MTL_PRAGMA_UNROLL
for (int d = 0; d < Dk / 8; ++d) {
  simdgroup_load(S[d], state_in + state_rows + 8 * d, Dk);
}

const int num_chunks = (T + C - 1) / C;
for (int chunk = 0; chunk < num_chunks; ++chunk) {
  const int t0 = chunk * C;
  const int live = T - t0 < C ? T - t0 : C;  // real tokens in this chunk
  threadgroup float* xo = XO + (chunk % 2) * C * LX;  // the last chunk's out may still be read

  // Stage the chunk: q, k, v (zeros past T), cumulative decay, beta.
  for (int e = tid; e < C * Dk; e += NT) {
    const int i = e / Dk;
    const int d = e % Dk;
    const size_t src = (size_t(batch * T + t0 + i) * Hv + hv) * Dk + d;  // no int overflow
    qs[i * LK + d] = i < live ? static_cast<float>(q[src]) : 0.0f;
    ks[i * LK + d] = i < live ? static_cast<float>(k[src]) : 0.0f;
  }
  for (int e = tid; e < C * BV; e += NT) {
    const int i = e / BV;
    const int c = e % BV;
    const size_t src = (size_t(batch * T + t0 + i) * Hv + hv) * Dv + col0 + c;
    xo[i * LX + c] = i < live ? static_cast<float>(v[src]) : 0.0f;
  }
  const int gates = (batch * T + t0) * Hv + hv;  // g, beta of the chunk's first token; stride Hv
  for (int i = tid; i < C; i += NT) {
    float sum = 0.0f;
    for (int j = 0; j <= i && j < live; ++j) {
      sum += static_cast<float>(g[gates + j * Hv]);
    }
    gc[i] = sum;
    beta_c[i] = i < live ? static_cast<float>(beta[gates + i * Hv]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // With the chunk's starting state, this simdgroup's rows: R^T = beta (v - exp(gc) S k)^T and
  // out^T = exp(gc) S q^T, by token block.
  tile8 xt[NB];
  tile8 ot[NB];
  MLX_MTL_PRAGMA_UNROLL
  for (int ib = 0; ib < NB; ++ib) {
    tile8 sk = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    tile8 sq = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    MLX_MTL_PRAGMA_UNROLL
    for (int d = 0; d < Dk / 8; ++d) {
      const tile8 kt = load_tile(ks + 8 * ib * LK + 8 * d, LK, true, lane);
      const tile8 qt = load_tile(qs + 8 * ib * LK + 8 * d, LK, true, lane);
      simdgroup_multiply_accumulate(sk, S[d], kt, sk);
      simdgroup_multiply_accumulate(sq, S[d], qt, sq);
    }
    xt[ib] = load_tile(xo + 8 * ib * LX + row0, LX, true, lane);  // v^T
    for (int j = 0; j < 2; ++j) {
      const int i = 8 * ib + ec + j;  // the element's token
      const float to_i = metal::exp(gc[i]);
      xt[ib].thread_elements()[j] =
          beta_c[i] * (xt[ib].thread_elements()[j] - to_i * sk.thread_elements()[j]);
      ot[ib].thread_elements()[j] = to_i * sq.thread_elements()[j];
    }
  }

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
      const float decay = col <= row ? metal::exp(gc[row] - gc[col]) : 0.0f;
      kk.thread_elements()[j] = col < row ? -beta_c[row] * decay * kk.thread_elements()[j] : 0.0f;
      qk.thread_elements()[j] *= decay;
    }
    if (ib == jb) {
      kk = unit_lower_inverse8(kk, lane);
    }
    store_tile(kk, A + 8 * ib * LC + 8 * jb, LC, false, lane);
    store_tile(qk, P + 8 * ib * LC + 8 * jb, LC, false, lane);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // (I + A) X = R by blocks, transposed: X^T_b = (R^T_b + sum_{c<b} X^T_c (-A_bc)^T) inv_b^T.
  MLX_MTL_PRAGMA_UNROLL
  for (int ib = 0; ib < NB; ++ib) {
    for (int jb = 0; jb < ib; ++jb) {
      const tile8 at = load_tile(A + 8 * ib * LC + 8 * jb, LC, true, lane);
      simdgroup_multiply_accumulate(xt[ib], xt[jb], at, xt[ib]);
    }
    const tile8 inverse_t = load_tile(A + 8 * ib * LC + 8 * ib, LC, true, lane);
    tile8 solved;
    simdgroup_multiply(solved, xt[ib], inverse_t);
    xt[ib] = solved;
  }

  // out^T += X^T P^T (blocks of P^T with jb > ib are zero), staged for the write below.
  MLX_MTL_PRAGMA_UNROLL
  for (int ib = 0; ib < NB; ++ib) {
    for (int jb = 0; jb <= ib; ++jb) {
      const tile8 pt = load_tile(P + 8 * ib * LC + 8 * jb, LC, true, lane);
      simdgroup_multiply_accumulate(ot[ib], xt[jb], pt, ot[ib]);
    }
    store_tile(ot[ib], xo + 8 * ib * LX + row0, LX, true, lane);
  }

  // S = exp(gc_last) S + (X^T exp(gc_last - gc)) k
  const float chunk_decay = metal::exp(gc[C - 1]);
  MLX_MTL_PRAGMA_UNROLL
  for (int ib = 0; ib < NB; ++ib) {
    for (int j = 0; j < 2; ++j) {
      xt[ib].thread_elements()[j] *= metal::exp(gc[C - 1] - gc[8 * ib + ec + j]);
    }
  }
  MLX_MTL_PRAGMA_UNROLL
  for (int d = 0; d < Dk / 8; ++d) {
    S[d].thread_elements() *= chunk_decay;
    MLX_MTL_PRAGMA_UNROLL
    for (int ib = 0; ib < NB; ++ib) {
      const tile8 kt = load_tile(ks + 8 * ib * LK + 8 * d, LK, false, lane);
      simdgroup_multiply_accumulate(S[d], xt[ib], kt, S[d]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int e = tid; e < live * BV; e += NT) {
    const int i = e / BV;
    const int c = e % BV;
    out[(size_t(batch * T + t0 + i) * Hv + hv) * Dv + col0 + c] = xo[i * LX + c];
  }
  // no barrier needed here: the next chunk stages into the other half of XO, and all it
  // overwrites besides was last read before the barrier above
}

MLX_MTL_PRAGMA_UNROLL
for (int d = 0; d < Dk / 8; ++d) {
  simdgroup_store(S[d], state_out + state_rows + 8 * d, Dk);
}
