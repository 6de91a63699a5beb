// Planted: a threadgroup pointer assigned to a device pointer. inp, out: [64] T
uint i = thread_position_in_grid.x;
threadgroup float staged[32];
staged[i % 32] = inp[i];
threadgroup_barrier(mem_flags::mem_threadgroup);
device float* row = staged;
out[i] = row[31 - i % 32];
