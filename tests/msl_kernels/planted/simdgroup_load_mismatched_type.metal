// Planted bug: a simdgroup_load of bfloat data into a float matrix (MSL has no such overload).
// inp: [64] bfloat, out: [64] float; one SIMD group.
simdgroup_matrix<float, 8, 8> tile;
simdgroup_load(tile, inp, 8);
simdgroup_store(tile, out, 8);
