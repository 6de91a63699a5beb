// out[i] = 2 * inp[i + OFFSET] through a header helper; OFFSET = 1 reads past the end.
// inp: [N] float, out: [N] float
uint i = thread_position_in_grid.x;
out[i] = twice(inp, i + OFFSET);
