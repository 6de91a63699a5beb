// Sum of each row by a threadgroup tree reduction: one threadgroup of N threads per row.
// inp: [R, N] T, out: [R] float; N (template) a power of two.
uint t = thread_position_in_threadgroup.x;
uint row = threadgroup_position_in_grid.y;
threadgroup float partial[N];
partial[t] = float(inp[row * N + t]);
threadgroup_barrier(mem_flags::mem_threadgroup);
for (uint stride = N / 2; stride > 0; stride /= 2) {
  if (t < stride) {
    partial[t] += partial[t + stride];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (t == 0) {
  out[row] = partial[0];
}
