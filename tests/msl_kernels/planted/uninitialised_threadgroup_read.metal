// Planted bug: reads a threadgroup element that no thread wrote (staged[0]).
// inp: [N] float, out: [N] float; threadgroups of 32 threads
uint t = thread_position_in_threadgroup.x;
uint i = thread_position_in_grid.x;
threadgroup float staged[32];
if (t > 0) {
  staged[t] = inp[i];
}
threadgroup_barrier(mem_flags::mem_threadgroup);
out[i] = staged[t];
