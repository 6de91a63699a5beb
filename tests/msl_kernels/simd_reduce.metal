// Per row: the sum (simd_sum per SIMD group, then a simd_shuffle_xor butterfly over the groups'
// partial sums), the maximum (simd_max, simd_broadcast) and each SIMD group's inclusive prefix sum.
// inp: [R, N] float, total: [R] float, maximum: [R] float, prefix: [R, N] float.
// One threadgroup of N threads per row, N (template) a multiple of 32, at most 1024.
uint t = thread_position_in_threadgroup.x;
uint row = threadgroup_position_in_grid.y;
uint lane = thread_index_in_simdgroup;
uint group = simdgroup_index_in_threadgroup;
constexpr uint groups = N / 32;
float x = inp[row * N + t];
prefix[row * N + t] = simd_prefix_inclusive_sum(x);

threadgroup float sums[groups];
threadgroup float maxima[groups];
float group_sum = simd_sum(x);
float group_max = simd_max(x);
if (lane == 0) {
  sums[group] = group_sum;
  maxima[group] = group_max;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (group == 0) {
  float s = lane < groups ? sums[lane] : 0.0f;
  float m = lane < groups ? maxima[lane] : -INFINITY;
  for (ushort offset = 16; offset > 0; offset /= 2) {
    s += simd_shuffle_xor(s, offset);
  }
  m = simd_max(m);
  float first = simd_broadcast(s, 7);  // every lane holds the sum after the butterfly
  if (lane == 0) {
    total[row] = first;
    maximum[row] = m;
  }
}
