// Planted: a simdgroup_load of bfloat data into a float matrix. inp: [64] T = bfloat, out: [64]
simdgroup_matrix<float, 8, 8> tile;
simdgroup_load(tile, inp, 8);
simdgroup_store(tile, out, 8);
