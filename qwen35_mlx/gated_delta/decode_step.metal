// Fused Gated DeltaNet decode step for one token (docs/ARCHITECTURE.md §2.4 steps 3-8):
// causal depthwise conv + SiLU, q/k L2 norm, decay and beta, the delta-rule update of the state
// and the gated RMSNorm of the output, in one dispatch.
// SPLIT threadgroups per (batch, value head), each owning ROWS = Dv / SPLIT state rows (value
// dims), so that a small batch still fills the GPU. Each simdgroup holds its rows in registers,
// the 32 lanes of a simdgroup striding over the key dims; the rows are loaded first, so that
// the loads are in flight during the conv and the norms. Every threadgroup needs q and k whole:
// it convolves all 2 Dk of them and its ROWS value channels. The gated RMSNorm needs the whole
// head: with SPLIT == 1 it runs here, else gated_norm.metal runs it on `out` (the scan output).
// Rounding to InT where the plain layer rounds (conv output, SiLU, scan output, normed output)
// keeps both paths alike in bfloat16.
//
// Template: InT activation dtype; Dk, Dv head dims; Hk, Hv key / value heads; K conv taps;
//           SG simdgroups per threadgroup; SPLIT threadgroups per head.
// qkv            [B, C]           the token's projection, C = 2 * Hk * Dk + Hv * Dv ([q | k | v])
// z              [B, Hv, Dv]      output gate
// a              [B, Hv]          decay input
// b              [B, Hv]          beta logits
// conv_state     [B, K - 1, C]    the previous K - 1 projections
// conv_weight    [C, K]           depthwise taps (stored [C, K, 1])
// A_log          [Hv]
// dt_bias        [Hv]
// norm_weight    [Dv]             gated RMSNorm weight (plain w)
// state_in       [B, Hv, Dv, Dk]  float32
// norm_eps       scalar float
// out            [B, 1, Hv * Dv]  InT: gated-normed output (SPLIT == 1), else the scan output
// state_out      [B, Hv, Dv, Dk]  float32
// conv_state_out [B, K - 1, C]

constexpr int C = 2 * Hk * Dk + Hv * Dv;
constexpr int NT = 32 * SG;  // threads per threadgroup
constexpr int PER_LANE = (Dk + 31) / 32;  // key dims held by one lane
constexpr int ROWS = Dv / SPLIT;  // state rows of this threadgroup
constexpr int ROWS_PER_SG = (ROWS + SG - 1) / SG;
const int n = threadgroup_position_in_grid.z;  // batch * Hv + value head
const int row0 = threadgroup_position_in_grid.y * ROWS;  // this threadgroup's first row
const int batch = n / Hv;
const int hv = n % Hv;
const int hk = hv / (Hv / Hk);  // GQA: value head hv reads key head hv / (Hv / Hk)
const int tid = thread_index_in_threadgroup;
const int sg = simdgroup_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;

// 0. This simdgroup's state rows sg, sg + SG, ... of the threadgroup's ROWS.
float s[ROWS_PER_SG][PER_LANE];
MLX_MTL_PRAGMA_UNROLL
for (int r = 0; r < ROWS_PER_SG; ++r) {
  const int row = sg + SG * r;
  auto s_in = state_in + (size_t(n) * Dv + row0 + row) * Dk;
  MLX_MTL_PRAGMA_UNROLL
  for (int i = 0; i < PER_LANE; ++i) {
    const int d = lane + 32 * i;
    s[r][i] = row < ROWS && d < Dk ? s_in[d] : 0.0f;
  }
}

// 1. Conv + SiLU over q, k and this threadgroup's v channels; shift their conv state. A key
// head's q/k channels are shared by Hv / Hk value heads and SPLIT threadgroups: only the first
// threadgroup of the first of those heads writes their conv state. Thread 0 also computes
// decay = exp(-exp(A_log) * softplus(a + dt_bias)) and beta = sigmoid(b) for all.
threadgroup float mixed[2 * Dk + ROWS];  // [q | k | v rows] of this threadgroup after conv, SiLU
threadgroup float gates[2];  // decay, beta
const bool writes_qk_state = hv % (Hv / Hk) == 0 && row0 == 0;
for (int i = tid; i < 2 * Dk + ROWS; i += NT) {
  const int c = i < Dk ? hk * Dk + i
              : i < 2 * Dk ? Hk * Dk + hk * Dk + (i - Dk)
              : 2 * Hk * Dk + hv * Dv + row0 + (i - 2 * Dk);
  auto past = conv_state + batch * (K - 1) * C + c;  // stride C per step
  InT window[K];  // the channel's last K inputs, oldest first, each read once
  for (int j = 0; j < K - 1; ++j) {
    window[j] = past[j * C];
  }
  window[K - 1] = qkv[batch * C + c];
  float acc = 0.0f;
  for (int j = 0; j < K; ++j) {
    acc += static_cast<float>(static_cast<InT>(conv_weight[c * K + j])) *
           static_cast<float>(window[j]);
  }
  const float conv = static_cast<float>(static_cast<InT>(acc));
  mixed[i] = static_cast<float>(static_cast<InT>(conv / (1.0f + metal::exp(-conv))));
  if (i >= 2 * Dk || writes_qk_state) {
    auto next = conv_state_out + batch * (K - 1) * C + c;
    for (int j = 0; j < K - 1; ++j) {
      next[j * C] = window[j + 1];
    }
  }
}
if (tid == 0) {
  const float x = static_cast<float>(a[n]) + static_cast<float>(dt_bias[hv]);
  const float softplus = metal::max(x, 0.0f) + metal::log(1.0f + metal::exp(-metal::abs(x)));
  gates[0] = metal::exp(-metal::exp(static_cast<float>(A_log[hv])) * softplus);
  gates[1] = 1.0f / (1.0f + metal::exp(-static_cast<float>(b[n])));
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. q, k L2-normalised in every simdgroup (each needs them whole); q also scaled by Dk^-1/2.
float q_lane[PER_LANE];
float k_lane[PER_LANE];
float q_squares = 0.0f;
float k_squares = 0.0f;
MLX_MTL_PRAGMA_UNROLL
for (int i = 0; i < PER_LANE; ++i) {
  const int d = lane + 32 * i;
  q_lane[i] = d < Dk ? mixed[d] : 0.0f;
  k_lane[i] = d < Dk ? mixed[Dk + d] : 0.0f;
  q_squares += q_lane[i] * q_lane[i];
  k_squares += k_lane[i] * k_lane[i];
}
const float q_scale = metal::rsqrt(simd_sum(q_squares) + 1e-6f) * metal::rsqrt(float(Dk));
const float k_scale = metal::rsqrt(simd_sum(k_squares) + 1e-6f);
MLX_MTL_PRAGMA_UNROLL
for (int i = 0; i < PER_LANE; ++i) {
  q_lane[i] *= q_scale;
  k_lane[i] *= k_scale;
}

const float decay = gates[0];
const float beta = gates[1];

// 3. The delta rule on each held row; o = S^T q rounded to InT as the plain layer casts it.
threadgroup float scan_out[SPLIT == 1 ? Dv : 1];  // the head's o, for the norm below
MLX_MTL_PRAGMA_UNROLL
for (int r = 0; r < ROWS_PER_SG; ++r) {
  const int row = sg + SG * r;
  if (row < ROWS) {
    auto s_out = state_out + (size_t(n) * Dv + row0 + row) * Dk;
    float remembered = 0.0f;
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < PER_LANE; ++i) {
      s[r][i] *= decay;
      remembered += s[r][i] * k_lane[i];
    }
    const float delta = (mixed[2 * Dk + row] - simd_sum(remembered)) * beta;
    float o = 0.0f;
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < PER_LANE; ++i) {
      const int d = lane + 32 * i;
      s[r][i] += k_lane[i] * delta;
      o += s[r][i] * q_lane[i];
      if (d < Dk) {
        s_out[d] = s[r][i];
      }
    }
    o = simd_sum(o);
    if (lane == 0) {
      if (SPLIT == 1) {
        scan_out[row] = static_cast<float>(static_cast<InT>(o));
      } else {
        out[n * Dv + row0 + row] = static_cast<InT>(o);
      }
    }
  }
}

// 4. Gated RMSNorm (gated_norm.h) by simdgroup 0 when this threadgroup holds the whole head.
if (SPLIT == 1) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float o_lane[(Dv + 31) / 32];
    for (int i = 0; i < (Dv + 31) / 32; ++i) {
      const int d = lane + 32 * i;
      o_lane[i] = d < Dv ? scan_out[d] : 0.0f;
    }
    gated_rms_norm<Dv>(o_lane, z + n * Dv, norm_weight, out + n * Dv, norm_eps, lane);
  }
}
