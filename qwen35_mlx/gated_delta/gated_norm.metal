// The gated RMSNorm after a split decode step (decode_step.metal with SPLIT > 1, whose
// threadgroups each hold part of a head's Dv outputs): one simdgroup per (batch, value head).
//
// Template: InT activation dtype; Dv value head dim.
// o              [B, Hv, Dv]      InT, the scan output
// z              [B, Hv, Dv]      output gate
// norm_weight    [Dv]             gated RMSNorm weight (plain w)
// norm_eps       scalar float
// y              [B, 1, Hv * Dv]  InT, gated-normed output

const int n = threadgroup_position_in_grid.z;  // batch * Hv + value head
const uint lane = thread_index_in_simdgroup;
float o_lane[(Dv + 31) / 32];
for (int i = 0; i < (Dv + 31) / 32; ++i) {
  const uint d = lane + 32 * i;
  o_lane[i] = d < Dv ? static_cast<float>(o[n * Dv + d]) : 0.0f;
}
gated_rms_norm<Dv>(o_lane, z + n * Dv, norm_weight, y + n * Dv, norm_eps, lane);
