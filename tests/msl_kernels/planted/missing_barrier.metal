// Planted bug: row_sum.metal without the barrier inside the reduction loop (a race).
// inp: [R, N] float, out: [R] float
uint t = thread_position_in_threadgroup.x;
uint row = threadgroup_position_in_grid.y;
threadgroup float partial[N];
partial[t] = inp[row * N + t];
threadgroup_barrier(mem_flags::mem_threadgroup);
for (uint stride = N / 2; stride > 0; stride /= 2) {
  if (t < stride) {
    partial[t] += partial[t + stride];
  }
}
if (t == 0) {
  out[row] = partial[0];
}
