// Planted bug: bfloat matrices multiplied into a float accumulator (MSL has one element type
// across d, a, b and c). inp: [64] bfloat (an 8x8 matrix A), out: [64] float (A @ A).
simdgroup_matrix<bfloat, 8, 8> a;
simdgroup_load(a, inp, 8);
simdgroup_matrix<float, 8, 8> product = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
simdgroup_multiply_accumulate(product, a, a, product);
simdgroup_store(product, out, 8);
