// Chunked gated delta rule for prefill, the pass over the chunks: the WY/UT form of chunked.py
// with each chunk's W, P and decays from chunk_prepare.metal (its header comment defines them).
// Only the state crosses chunks. The value columns of the state evolve independently, so a
// threadgroup owns BV = 8 * SG of them (grid y) for one (batch, value head) (grid z), and each
// simdgroup keeps its 8 state rows (value dims) x Dk in registers as simdgroup matrices.
// Everything a simdgroup computes is transposed, value dim first, so that the state is used in
// its stored [Dv, Dk] layout:
//   R^T   = (v - exp(gc) S k)^T                                 [BV, C]
//   X^T   = R^T W^T                                             [BV, C]  new values
//   out^T = exp(gc) S q^T + X^T P^T
//   S     = exp(gc_last) S + (X^T exp(gc_last - gc)) k
// All products are 8 x 8 simdgroup matrix products (docs/ARCHITECTURE.md §8); X^T and out^T
// stay in registers, W and P tiles come straight from device memory. Threadgroup arrays are
// token-major with rows padded to 8 (mod 32) words, and their tiles move through load_tile /
// store_tile, whose lane-dependent order puts each step's 32 lanes in distinct banks
// (chunked_scan.h); the staging writes (lanes along a row of 32 or 128) are conflict-free at any
// stride.
// Tokens past T (the last chunk's padding) read as zeros, and their rows and columns of W and
// P are zero: no effect.
//
// Template: Dk, Dv head dims; Hv value heads; C chunk (multiple of 8); SG simdgroups.
// q         [B, T, Hv, Dk]      normalised, scaled by Dk^-1/2
// k         [B, T, Hv, Dk]      normalised
// v         [B, T, Hv, Dv]
// W         [B, Hv, NC, C, C]   float32, (I + A)^-1 diag(beta) per chunk; NC = ceil(T / C)
// P         [B, Hv, NC, C, C]   float32
// gc        [B, Hv, NC, C]      float32, cumulative log decay per chunk
// state_in  [B, Hv, Dv, Dk]     float32
// T         scalar int          tokens
// out       [B, T, Hv, Dv]      float32
// state_out [B, Hv, Dv, Dk]     float32

constexpr int BV = 8 * SG;  // value columns of this threadgroup
constexpr int NT = 32 * SG;  // threads per threadgroup
constexpr int NB = C / 8;  // 8-token blocks per chunk
constexpr int LK = tile_stride(Dk);  // padded row strides
constexpr int LX = tile_stride(BV);
const int n = threadgroup_position_in_grid.z;  // batch * Hv + value head
const int batch = n / Hv;
const int hv = n % Hv;
const int col0 = threadgroup_position_in_grid.y * BV;  // first value column
const int tid = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int sg = simdgroup_index_in_threadgroup;
const int row0 = 8 * sg;  // this simdgroup's rows within BV
const int ec = tile_col(lane);  // this lane's elements of a tile are in columns ec, ec + 1

threadgroup float qs[C * LK];  // q of the chunk [C, Dk]
threadgroup float ks[C * LK];  // k of the chunk [C, Dk]
threadgroup float XO[2 * C * LX];  // per chunk parity: v of the chunk, then out [C, BV]
threadgroup float gc_c[C];  // cumulative log decay of the chunk

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
  const size_t rows = (size_t(n) * num_chunks + chunk) * C;  // this chunk's rows of W, P, gc
  const device float* w_chunk = W + rows * C;  // [C, C]
  const device float* p_chunk = P + rows * C;

  // Stage the chunk: q, k, v (zeros past T), cumulative decay.
  const size_t first = size_t(batch * T + t0) * Hv + hv;  // the chunk's first token, this head
  stage_rows<C, Dk>(qs, LK, q + first * Dk, Hv * Dk, live, tid, NT);
  stage_rows<C, Dk>(ks, LK, k + first * Dk, Hv * Dk, live, tid, NT);
  stage_rows<C, BV>(xo, LX, v + first * Dv + col0, Hv * Dv, live, tid, NT);
  for (int i = tid; i < C; i += NT) {
    gc_c[i] = gc[rows + i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // With the chunk's starting state, this simdgroup's rows: R^T = (v - exp(gc) S k)^T and
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
      const float to_i = metal::exp(gc_c[8 * ib + ec + j]);  // decay to the element's token
      xt[ib].thread_elements()[j] -= to_i * sk.thread_elements()[j];
      ot[ib].thread_elements()[j] = to_i * sq.thread_elements()[j];
    }
  }

  // X^T = R^T W^T, in place from the last block: X^T_ib = sum_{jb <= ib} R^T_jb W_ib,jb^T.
  MLX_MTL_PRAGMA_UNROLL
  for (int ib = NB - 1; ib >= 0; --ib) {
    tile8 x = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    MLX_MTL_PRAGMA_UNROLL
    for (int jb = 0; jb <= ib; ++jb) {
      tile8 wt;
      simdgroup_load(wt, w_chunk + 8 * ib * C + 8 * jb, C, ulong2(0), true);
      simdgroup_multiply_accumulate(x, xt[jb], wt, x);
    }
    xt[ib] = x;
  }

  // out^T += X^T P^T (blocks of P^T with jb > ib are zero), staged for the write below.
  MLX_MTL_PRAGMA_UNROLL
  for (int ib = 0; ib < NB; ++ib) {
    MLX_MTL_PRAGMA_UNROLL
    for (int jb = 0; jb <= ib; ++jb) {
      tile8 pt;
      simdgroup_load(pt, p_chunk + 8 * ib * C + 8 * jb, C, ulong2(0), true);
      simdgroup_multiply_accumulate(ot[ib], xt[jb], pt, ot[ib]);
    }
    store_tile(ot[ib], xo + 8 * ib * LX + row0, LX, true, lane);
  }

  // S = exp(gc_last) S + (X^T exp(gc_last - gc)) k
  const float gc_last = gc_c[C - 1];
  MLX_MTL_PRAGMA_UNROLL
  for (int ib = 0; ib < NB; ++ib) {
    for (int j = 0; j < 2; ++j) {
      xt[ib].thread_elements()[j] *= metal::exp(gc_last - gc_c[8 * ib + ec + j]);
    }
  }
  const float chunk_decay = metal::exp(gc_last);
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
