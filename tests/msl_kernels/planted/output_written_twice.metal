// Planted bug: SIMD group 0 clears SIMD group 1's half of out, then SIMD group 1 writes it: two
// threads write each of those elements (a write-write race; a simd_sum orders the lanes of one SIMD
// group only). The emulator runs every thread to the simd_sum before any goes on, so the second
// write wins in every thread order and comparing orders cannot catch it.
// inp: [N] float, out: [N] float; threadgroups of 64 threads
uint t = thread_position_in_threadgroup.x;
uint i = thread_position_in_grid.x;
if (t < 32) {
  out[i + 32] = 0.0f;
}
const float total = simd_sum(inp[i]);
out[i] = inp[i] + 0.0f * total;
