// Planted bug: 40 KB of threadgroup memory, more than the 32 KB Apple GPUs have.
// inp: [N] float, out: [N] float
uint t = thread_position_in_threadgroup.x;
uint i = thread_position_in_grid.x;
threadgroup float first[5000];
threadgroup float second[5000];
first[t] = inp[i];
second[t] = inp[i];
threadgroup_barrier(mem_flags::mem_threadgroup);
out[i] = first[t] + second[t];
