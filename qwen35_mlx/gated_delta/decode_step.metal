// Fused Gated DeltaNet decode step for one token (docs/ARCHITECTURE.md §2.4 steps 3-8):
// causal depthwise conv + SiLU, q/k L2 norm, decay and beta, the delta-rule update of the state
// and the gated RMSNorm of the output, in one dispatch.
// One threadgroup per (batch, value head): SG simdgroups take the state rows (value dims) in turn,
// the 32 lanes of a simdgroup stride over the key dims. Rounding to InT where the plain layer
// rounds (conv output, SiLU, scan output, normed output) keeps both paths alike in bfloat16.
//
// Template: InT activation dtype; Dk, Dv head dims; Hk, Hv key / value heads; K conv taps;
//           SG simdgroups per threadgroup.
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
// y              [B, 1, Hv * Dv]  InT, gated-normed output
// state_out      [B, Hv, Dv, Dk]  float32
// conv_state_out [B, K - 1, C]

constexpr int C = 2 * Hk * Dk + Hv * Dv;
constexpr int NT = 32 * SG;  // threads per threadgroup
constexpr int PER_LANE = (Dk + 31) / 32;  // key dims held by one lane
const int n = threadgroup_position_in_grid.z;  // batch * Hv + value head
const int batch = n / Hv;
const int hv = n % Hv;
const int hk = hv / (Hv / Hk);  // GQA: value head hv reads key head hv / (Hv / Hk)
const int tid = thread_index_in_threadgroup;
const int sg = simdgroup_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;

// 1. Conv + SiLU over this head's channels; shift the conv state. A key head's q/k channels are
// shared by Hv / Hk value heads: only the first of them writes their conv state.
threadgroup float mixed[2 * Dk + Dv];  // [q | k | v] of this head after conv and SiLU
const bool writes_qk_state = hv % (Hv / Hk) == 0;
for (int i = tid; i < 2 * Dk + Dv; i += NT) {
  const int c = i < Dk ? hk * Dk + i
              : i < 2 * Dk ? Hk * Dk + hk * Dk + (i - Dk)
              : 2 * Hk * Dk + hv * Dv + (i - 2 * Dk);
  auto past = conv_state + batch * (K - 1) * C + c;  // stride C per step
  const InT current = qkv[batch * C + c];
  float acc = 0.0f;
  for (int j = 0; j < K - 1; ++j) {
    acc += static_cast<float>(static_cast<InT>(conv_weight[c * K + j])) *
           static_cast<float>(past[j * C]);
  }
  acc += static_cast<float>(static_cast<InT>(conv_weight[c * K + K - 1])) *
         static_cast<float>(current);
  const float conv = static_cast<float>(static_cast<InT>(acc));
  mixed[i] = static_cast<float>(static_cast<InT>(conv / (1.0f + metal::exp(-conv))));
  if (i >= 2 * Dk || writes_qk_state) {
    auto next = conv_state_out + batch * (K - 1) * C + c;
    for (int j = 0; j < K - 2; ++j) {
      next[j * C] = past[(j + 1) * C];
    }
    next[(K - 2) * C] = current;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. q, k L2-normalised in every simdgroup (each needs them whole); q also scaled by Dk^-1/2.
float q_lane[PER_LANE];
float k_lane[PER_LANE];
float q_squares = 0.0f;
float k_squares = 0.0f;
for (int i = 0; i < PER_LANE; ++i) {
  const int d = lane + 32 * i;
  q_lane[i] = d < Dk ? mixed[d] : 0.0f;
  k_lane[i] = d < Dk ? mixed[Dk + d] : 0.0f;
  q_squares += q_lane[i] * q_lane[i];
  k_squares += k_lane[i] * k_lane[i];
}
const float q_scale = metal::rsqrt(simd_sum(q_squares) + 1e-6f) * metal::rsqrt(float(Dk));
const float k_scale = metal::rsqrt(simd_sum(k_squares) + 1e-6f);
for (int i = 0; i < PER_LANE; ++i) {
  q_lane[i] *= q_scale;
  k_lane[i] *= k_scale;
}

// 3. decay = exp(-exp(A_log) * softplus(a + dt_bias)), beta = sigmoid(b)
const float x = static_cast<float>(a[n]) + static_cast<float>(dt_bias[hv]);
const float softplus = metal::max(x, 0.0f) + metal::log(1.0f + metal::exp(-metal::abs(x)));
const float decay = metal::exp(-metal::exp(static_cast<float>(A_log[hv])) * softplus);
const float beta = 1.0f / (1.0f + metal::exp(-static_cast<float>(b[n])));

// 4. The delta rule, one state row (value dim) per simdgroup at a time.
threadgroup float scan_out[Dv];  // o = S^T q, rounded to InT as the plain layer casts it
for (int row = sg; row < Dv; row += SG) {
  auto s_in = state_in + (n * Dv + row) * Dk;
  auto s_out = state_out + (n * Dv + row) * Dk;
  float s[PER_LANE];
  float remembered = 0.0f;
  for (int i = 0; i < PER_LANE; ++i) {
    const int d = lane + 32 * i;
    s[i] = d < Dk ? s_in[d] * decay : 0.0f;
    remembered += s[i] * k_lane[i];
  }
  const float delta = (mixed[2 * Dk + row] - simd_sum(remembered)) * beta;
  float out = 0.0f;
  for (int i = 0; i < PER_LANE; ++i) {
    const int d = lane + 32 * i;
    s[i] += k_lane[i] * delta;
    out += s[i] * q_lane[i];
    if (d < Dk) {
      s_out[d] = s[i];
    }
  }
  out = simd_sum(out);
  if (lane == 0) {
    scan_out[row] = static_cast<float>(static_cast<InT>(out));
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 5. Gated RMSNorm: y = w * cast(rmsnorm(o)) * silu(z)
float o_squares = 0.0f;
for (int i = lane; i < Dv; i += 32) {
  o_squares += scan_out[i] * scan_out[i];
}
const float inv_rms = metal::rsqrt(simd_sum(o_squares) / Dv + norm_eps);
for (int i = tid; i < Dv; i += NT) {
  const float normed = static_cast<float>(static_cast<InT>(scan_out[i] * inv_rms));
  const float gate = static_cast<float>(z[n * Dv + i]);
  const float silu = gate / (1.0f + metal::exp(-gate));
  y[n * Dv + i] = static_cast<InT>(static_cast<float>(norm_weight[i]) * normed * silu);
}
