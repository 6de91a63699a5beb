// Planted: a double (Metal has no 64-bit floats). inp, out: [64] T
uint i = thread_position_in_grid.x;
double wide = static_cast<double>(inp[i]);
out[i] = static_cast<float>(wide * 2);
