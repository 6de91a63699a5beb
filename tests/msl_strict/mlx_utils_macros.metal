// Not a bug: MLX's utils.h macros, which every MLX kernel may use. inp, out: [64] T
MLX_MTL_CONST int kSteps = 4;
uint i = thread_position_in_grid.x;
float sum = 0.0f;
MLX_MTL_PRAGMA_UNROLL
for (int step = 0; step < kSteps; ++step) {
  sum += static_cast<float>(inp[i]);
}
out[i] = sum;
