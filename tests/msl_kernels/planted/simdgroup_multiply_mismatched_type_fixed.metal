// Correct twin of simdgroup_multiply_mismatched_type.metal: all four matrices bfloat.
// inp: [64] bfloat (an 8x8 matrix A), out: [64] bfloat (A @ A, rounded once).
simdgroup_matrix<bfloat, 8, 8> a;
simdgroup_load(a, inp, 8);
simdgroup_matrix<bfloat, 8, 8> product = make_filled_simdgroup_matrix<bfloat, 8, 8>(0.0f);
simdgroup_multiply_accumulate(product, a, a, product);
simdgroup_store(product, out, 8);
