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

// The row stride of a threadgroup array `width` floats wide whose 8 x 8 tiles load_tile and
// store_tile move: the smallest >= width that is 8 (mod 32) words, so that a tile step's 32
// lanes fall in 32 distinct banks (see load_tile).
constexpr int tile_stride(int width) {
  return width + (40 - width % 32) % 32;
}

// Where a lane's two elements of a tile at `stride` words per row lie, in the order it moves
// them: (r, c) at r * stride + c, or at c * stride + r when the tile is stored transposed.
// Lanes with r >= 4 (transposed: c >= 4) move element 1 first. With stride = 8 (mod 32), the
// first move touches words 8r + c, c even for r < 4 and odd for r >= 4, or transposed 8c + r
// with c in {0, 2, 5, 7}: 32 distinct banks, and likewise the second. (A simdgroup_load takes
// element 0 of every lane first: columns all even, 2-way conflicts at any stride.)
struct TileSlots {
  int first;  // offset of the element moved first
  int second;
  bool swapped;  // element 1 moves first
};

inline TileSlots tile_slots(int stride, bool transpose, uint lane) {
  const int r = tile_row(lane);
  const int c = tile_col(lane);
  const int element0 = transpose ? c * stride + r : r * stride + c;
  const int element1 = element0 + (transpose ? stride : 1);
  const bool swapped = (transpose ? c : r) >= 4;
  return {swapped ? element1 : element0, swapped ? element0 : element1, swapped};
}

// An 8 x 8 tile of threadgroup memory (transposed: tile(r, c) = src[c * stride + r]), moved
// through thread_elements() as two scalar loads per lane, as MLX's steel GEMM moves fragments.
inline tile8 load_tile(const threadgroup float* src, int stride, bool transpose, uint lane) {
  const TileSlots at = tile_slots(stride, transpose, lane);
  const float first = src[at.first];
  const float second = src[at.second];
  tile8 m;
  m.thread_elements()[0] = at.swapped ? second : first;
  m.thread_elements()[1] = at.swapped ? first : second;
  return m;
}

inline void store_tile(tile8 m, threadgroup float* dst, int stride, bool transpose, uint lane) {
  const TileSlots at = tile_slots(stride, transpose, lane);
  const float element0 = m.thread_elements()[0];
  const float element1 = m.thread_elements()[1];
  dst[at.first] = at.swapped ? element1 : element0;
  dst[at.second] = at.swapped ? element0 : element1;
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
