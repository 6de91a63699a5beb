// C = A @ B with 8x8 simdgroup matrices: one SIMD group (a threadgroup of 32) per 8x8 tile of C,
// staged through threadgroup memory on the way out.
// A: [M, K] float, B: [K, N] float, C: [M, N] float; M, N, K (template) multiples of 8.
uint tile_col = threadgroup_position_in_grid.x;
uint tile_row = threadgroup_position_in_grid.y;
simdgroup_matrix<float, 8, 8> acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
simdgroup_matrix<float, 8, 8> a;
simdgroup_matrix<float, 8, 8> b;
for (uint k = 0; k < K; k += 8) {
  simdgroup_load(a, A + tile_row * 8 * K + k, K);
  simdgroup_load(b, B + k * N + tile_col * 8, N);
  simdgroup_multiply_accumulate(acc, a, b, acc);
}
threadgroup float staged[64];
simdgroup_store(acc, staged, 8);
simdgroup_barrier(mem_flags::mem_threadgroup);
for (uint e = thread_index_in_simdgroup; e < 64; e += 32) {
  C[(tile_row * 8 + e / 8) * N + tile_col * 8 + e % 8] = staged[e];
}
