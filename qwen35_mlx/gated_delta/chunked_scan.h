// 8 x 8 simdgroup matrix helpers for chunked_scan.metal.
typedef simdgroup_matrix<float, 8, 8> tile8;

// The row and first column of the two elements (row, col) and (row, col + 1) that a lane holds
// of an 8 x 8 simdgroup matrix (thread_elements()): the layout of Apple GPUs, which MLX's steel
// GEMM kernels also assume.
inline int tile_row(uint lane) {
  return ((lane / 4) & 4) + ((lane / 2) % 4);
}
inline int tile_col(uint lane) {
  return ((lane / 4) & 2) * 2 + (lane % 2) * 2;
}

inline tile8 identity8(uint lane) {
  tile8 m = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  const int r = tile_row(lane);
  const int c = tile_col(lane);
  m.thread_elements()[0] = r == c ? 1.0f : 0.0f;
  m.thread_elements()[1] = r == c + 1 ? 1.0f : 0.0f;
  return m;
}

// (I - M)^-1 of a strictly lower triangular 8 x 8 M (nilpotent: M^8 = 0) as the product
// (I + M)(I + M^2)(I + M^4) = I + M + ... + M^7: seven 8 x 8 products instead of 28 serial steps. The
// entries stay small: |M| <= 1 here (normalised keys, beta < 1, decays <= 1).
inline tile8 unit_lower_inverse8(tile8 m, uint lane) {
  const tile8 eye = identity8(lane);
  tile8 m2, m4, factor, inverse, product;
  simdgroup_multiply(m2, m, m);
  simdgroup_multiply(m4, m2, m2);
  simdgroup_multiply_accumulate(inverse, m, eye, eye);  // I + M
  simdgroup_multiply_accumulate(factor, m2, eye, eye);  // I + M^2
  simdgroup_multiply(product, inverse, factor);
  simdgroup_multiply_accumulate(factor, m4, eye, eye);  // I + M^4
  simdgroup_multiply(inverse, product, factor);
  return inverse;
}
