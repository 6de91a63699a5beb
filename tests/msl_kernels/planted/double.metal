// Planted bug: a double (Metal has no 64-bit floating point). inp, out: [N] float
uint i = thread_position_in_grid.x;
double wide = static_cast<double>(inp[i]);
out[i] = static_cast<float>(wide * 2);
