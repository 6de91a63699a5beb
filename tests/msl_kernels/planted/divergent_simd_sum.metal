// Planted bug: simd_sum called by half of the lanes only.
// inp: [N] float, out: [N] float
uint i = thread_position_in_grid.x;
float x = inp[i];
if (thread_index_in_simdgroup < 16) {
  x = simd_sum(x);
}
out[i] = x;
