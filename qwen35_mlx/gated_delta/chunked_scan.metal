// Chunked gated delta rule for prefill: the WY/UT form of chunked.py, one kernel for all chunks.
// Within a chunk of C tokens the recurrence is solved in parallel; only the state crosses chunks.
// The value columns of the state evolve independently, so a threadgroup owns BV = 8 * SG of them
// (grid y) for one (batch, value head) (grid z), and each simdgroup keeps its 8 state rows
// (value dims) x Dk in registers as simdgroup matrices. Everything is computed transposed, with
// the value dim first, so that the state is used in its stored [Dv, Dk] layout:
//   gc      cumulative log decay within the chunk              [C]
//   A       beta_i exp(gc_i - gc_j) k_i.k_j for j < i         [C, C]
//   X^T     (beta (v - exp(gc) S k))^T solved by (I + A)        [BV, C]  new values
//   out^T = exp(gc) S q^T + X^T P^T,  P_ij = exp(gc_i - gc_j) q_i.k_j for j <= i
//   S     = exp(gc_last) S + X^T (exp(gc_last - gc) k)
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
const int n = threadgroup_position_in_grid.z;  // batch * Hv + value head
const int batch = n / Hv;
const int hv = n % Hv;
const int col0 = threadgroup_position_in_grid.y * BV;  // first value column
const int tid = thread_index_in_threadgroup;
const int row0 = 8 * simdgroup_index_in_threadgroup;  // this simdgroup's rows within BV

threadgroup float qT[Dk * C];  // q^T of the chunk; then exp(gc_last - gc) k, row-major [C, Dk]
threadgroup float kT[Dk * C];  // k^T of the chunk
threadgroup float A[C * C];
threadgroup float PT[C * C];  // P^T
threadgroup float XT[BV * C];  // S k^T, then the right side R^T, then X^T
threadgroup float OT[BV * C];  // out^T
threadgroup float gc[C];
threadgroup float beta_c[C];
threadgroup float chunk_decay[64];  // exp(gc_last) * I, 8 x 8

typedef simdgroup_matrix<float, 8, 8> tile8;
const tile8 zero = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
tile8 S[Dk / 8];  // this simdgroup's 8 x Dk slice of the state, in 8 x 8 tiles
auto state_rows = (n * Dv + col0 + row0) * Dk;
for (int d = 0; d < Dk / 8; ++d) {
  simdgroup_load(S[d], state_in + state_rows + 8 * d, Dk);
}

const int num_chunks = (T + C - 1) / C;
for (int chunk = 0; chunk < num_chunks; ++chunk) {
  const int t0 = chunk * C;
  const int live = T - t0 < C ? T - t0 : C;  // real tokens in this chunk

  // Stage the chunk: q^T, k^T (zeros past T), cumulative decay, beta.
  for (int e = tid; e < C * Dk; e += NT) {
    const int i = e / Dk;
    const int d = e % Dk;
    const size_t src = (size_t(batch * T + t0 + i) * Hv + hv) * Dk + d;  // no int overflow
    qT[d * C + i] = i < live ? static_cast<float>(q[src]) : 0.0f;
    kT[d * C + i] = i < live ? static_cast<float>(k[src]) : 0.0f;
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

  // With the chunk's starting state: S k^T -> XT and S q^T -> OT (this simdgroup's rows).
  for (int ib = 0; ib < C / 8; ++ib) {
    tile8 sk = zero;
    tile8 sq = zero;
    for (int d = 0; d < Dk / 8; ++d) {
      tile8 kt, qt;
      simdgroup_load(kt, kT + 8 * d * C + 8 * ib, C);
      simdgroup_load(qt, qT + 8 * d * C + 8 * ib, C);
      simdgroup_multiply_accumulate(sk, S[d], kt, sk);
      simdgroup_multiply_accumulate(sq, S[d], qt, sq);
    }
    simdgroup_store(sk, XT + row0 * C + 8 * ib, C);
    simdgroup_store(sq, OT + row0 * C + 8 * ib, C);
  }
  // A and P^T, masked before exp so no exp of a positive difference.
  for (int e = tid; e < C * C; e += NT) {
    const int i = e / C;
    const int j = e % C;
    float kk = 0.0f;
    float qk = 0.0f;
    float decay = 0.0f;
    if (j <= i) {
      for (int d = 0; d < Dk; ++d) {
        kk += kT[d * C + i] * kT[d * C + j];
        qk += qT[d * C + i] * kT[d * C + j];
      }
      decay = metal::exp(gc[i] - gc[j]);
    }
    A[i * C + j] = j < i ? beta_c[i] * decay * kk : 0.0f;
    PT[j * C + i] = decay * qk;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // R^T = beta (v - exp(gc) S k^T); out^T starts as exp(gc) S q^T; k decayed to the chunk end
  // replaces q^T (no longer needed); the chunk's decay as an 8 x 8 diagonal.
  for (int e = tid; e < C * BV; e += NT) {
    const int i = e / BV;
    const int c = e % BV;
    const size_t src = (size_t(batch * T + t0 + i) * Hv + hv) * Dv + col0 + c;
    const float v_ic = i < live ? static_cast<float>(v[src]) : 0.0f;
    const float to_i = metal::exp(gc[i]);
    XT[c * C + i] = beta_c[i] * (v_ic - to_i * XT[c * C + i]);
    OT[c * C + i] *= to_i;
  }
  for (int e = tid; e < C * Dk; e += NT) {
    const int i = e / Dk;
    const int d = e % Dk;
    qT[e] = kT[d * C + i] * metal::exp(gc[C - 1] - gc[i]);
  }
  for (int e = tid; e < 64; e += NT) {
    chunk_decay[e] = e % 9 == 0 ? metal::exp(gc[C - 1]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // (I + A) X = R by forward substitution; each value column on its own thread, no syncs.
  if (tid < BV) {
    threadgroup float* x = XT + tid * C;
    for (int i = 1; i < C; ++i) {
      float acc = x[i];
      for (int j = 0; j < i; ++j) {
        acc -= A[i * C + j] * x[j];
      }
      x[i] = acc;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // out^T += X^T P^T (blocks of P^T with jb > ib are zero); S = exp(gc_last) S + X^T k_end.
  for (int ib = 0; ib < C / 8; ++ib) {
    tile8 acc;
    simdgroup_load(acc, OT + row0 * C + 8 * ib, C);
    for (int jb = 0; jb <= ib; ++jb) {
      tile8 xt, pt;
      simdgroup_load(xt, XT + row0 * C + 8 * jb, C);
      simdgroup_load(pt, PT + 8 * jb * C + 8 * ib, C);
      simdgroup_multiply_accumulate(acc, xt, pt, acc);
    }
    simdgroup_store(acc, OT + row0 * C + 8 * ib, C);
  }
  tile8 decay_tile;
  simdgroup_load(decay_tile, chunk_decay, 8);
  for (int d = 0; d < Dk / 8; ++d) {
    tile8 update = zero;
    for (int ib = 0; ib < C / 8; ++ib) {
      tile8 xt, kt;
      simdgroup_load(xt, XT + row0 * C + 8 * ib, C);
      simdgroup_load(kt, qT + 8 * ib * Dk + 8 * d, Dk);
      simdgroup_multiply_accumulate(update, xt, kt, update);
    }
    tile8 next;
    simdgroup_multiply_accumulate(next, S[d], decay_tile, update);
    S[d] = next;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int e = tid; e < live * BV; e += NT) {
    const int i = e / BV;
    const int c = e % BV;
    out[(size_t(batch * T + t0 + i) * Hv + hv) * Dv + col0 + c] = OT[c * C + i];
  }
  // no barrier needed here: the next chunk's staging writes none of what was read since the last
}

for (int d = 0; d < Dk / 8; ++d) {
  simdgroup_store(S[d], state_out + state_rows + 8 * d, Dk);
}
