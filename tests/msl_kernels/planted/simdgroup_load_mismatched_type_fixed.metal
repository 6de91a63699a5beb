// Correct twin of simdgroup_load_mismatched_type.metal: the bfloat data staged as float first.
// inp: [64] bfloat, out: [64] float; one SIMD group.
uint lane = thread_index_in_simdgroup;
threadgroup float staged[64];
staged[lane] = static_cast<float>(inp[lane]);
staged[lane + 32] = static_cast<float>(inp[lane + 32]);
simdgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_matrix<float, 8, 8> tile;
simdgroup_load(tile, staged, 8);
simdgroup_store(tile, out, 8);
