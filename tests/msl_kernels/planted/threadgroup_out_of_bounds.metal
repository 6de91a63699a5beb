// Planted bug: writes one past the end of a threadgroup array.
// inp: [N] float, out: [N] float; threadgroups of 32 threads
uint t = thread_position_in_threadgroup.x;
uint i = thread_position_in_grid.x;
threadgroup float staged[32];
staged[t + 1] = inp[i];
threadgroup_barrier(mem_flags::mem_threadgroup);
out[i] = staged[t];
