// The gated RMSNorm of one head's scan output (docs/ARCHITECTURE.md §2.4 step 8), by one
// simdgroup: y = w * cast(rmsnorm(o)) * silu(z), rounded to InT where the plain layer rounds.
// o_lane[i] holds o[lane + 32 i] (zero past Dv); z, y point at this head's Dv values.
template <int Dv, typename Values, typename InT, typename W>
void gated_rms_norm(
    thread const Values& o_lane,  // float[(Dv + 31) / 32]
    const device InT* z,
    const device W* weight,
    device InT* y,
    float eps,
    uint lane) {
  float squares = 0.0f;
  for (int i = 0; i < (Dv + 31) / 32; ++i) {
    squares += o_lane[i] * o_lane[i];
  }
  const float inv_rms = metal::rsqrt(simd_sum(squares) / Dv + eps);
  for (int i = 0; i < (Dv + 31) / 32; ++i) {
    const uint d = lane + 32 * i;
    if (d < Dv) {
      const float normed = static_cast<float>(static_cast<InT>(o_lane[i] * inv_rms));
      const float gate = static_cast<float>(z[d]);
      const float silu = gate / (1.0f + metal::exp(-gate));
      y[d] = static_cast<InT>(static_cast<float>(weight[d]) * normed * silu);
    }
  }
}
