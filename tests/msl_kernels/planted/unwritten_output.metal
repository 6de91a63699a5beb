// Planted bug: every seventh element of out is never written.
// inp: [N] float, out: [N] float
uint i = thread_position_in_grid.x;
if (i % 7 != 3) {
  out[i] = inp[i];
}
