// Planted bug: reads one element past the end of inp (the last thread).
// inp: [N] float, out: [N] float
uint i = thread_position_in_grid.x;
out[i] = inp[i + 1];
