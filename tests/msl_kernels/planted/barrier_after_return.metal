// Planted bug: thread 5 returns early, the others wait at a barrier it never reaches.
// inp: [N] float, out: [N] float
uint t = thread_position_in_threadgroup.x;
uint i = thread_position_in_grid.x;
threadgroup float shared_copy[32];
if (t == 5) {
  out[i] = 0.0f;
  return;
}
shared_copy[t] = inp[i];
threadgroup_barrier(mem_flags::mem_threadgroup);
out[i] = shared_copy[(t + 1) % 32];
