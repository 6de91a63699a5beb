// Planted bug: the two halves of the threadgroup wait at different barriers.
// inp: [N] float, out: [N] float
uint t = thread_position_in_threadgroup.x;
uint i = thread_position_in_grid.x;
if (t < 16) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
} else {
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
out[i] = inp[i];
