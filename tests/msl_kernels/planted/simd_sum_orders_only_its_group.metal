// Planted bug: each thread reads what a thread of the other SIMD group wrote to threadgroup memory,
// with only a simd_sum in between, which orders the lanes of one SIMD group, not two groups (a
// threadgroup_barrier is missing). The emulator runs every thread to the simd_sum before any goes
// on, so each read sees the write in every thread order and comparing orders cannot catch it.
// inp: [N] float, out: [N] float; threadgroups of 64 threads
uint t = thread_position_in_threadgroup.x;
uint i = thread_position_in_grid.x;
threadgroup float staged[64];
staged[t] = inp[i];
const float total = simd_sum(inp[i]);
out[i] = staged[(t + 32) % 64] + 0.0f * total;
