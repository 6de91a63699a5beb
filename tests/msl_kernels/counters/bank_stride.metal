// Threadgroup-memory bank conflicts with known degrees: 33 conflict-free store steps fill a
// 32 x 33 word tile, then lane l reads word l * stride (32 / gcd(stride, 32) words per bank for
// stride > 0; stride 0 is a broadcast); then `barriers` more barriers.
// inp: [threads] float, stride: uint, barriers: int, out: [threads] float
threadgroup float tile[32 * 33];
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
if (sg == 0) {
  for (uint w = lane; w < 32 * 33; w += 32) {
    tile[w] = float(w);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const float read = tile[lane * stride];
for (int k = 0; k < barriers; ++k) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
out[thread_position_in_grid.x] = read + inp[thread_position_in_grid.x];
