// MLX's utils.h macros, which every MLX kernel may use: out = kSteps * inp.
// inp, out: [N] float
MLX_MTL_CONST int kSteps = 4;
uint i = thread_position_in_grid.x;
float sum = 0.0f;
MLX_MTL_PRAGMA_UNROLL
for (int step = 0; step < kSteps; ++step) {
  sum += inp[i];
}
int counted = 0;
MLX_MTL_LOOP_UNROLL
while (counted < kSteps) {
  counted++;
}
out[i] = sum * (counted == kSteps ? 1.0f : 0.0f);
