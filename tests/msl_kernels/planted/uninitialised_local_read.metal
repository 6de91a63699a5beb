// Planted bug: reads a thread-local array element that was never written (scratch[3]).
// inp: [N] float, out: [N] float
uint i = thread_position_in_grid.x;
float scratch[4];
for (uint j = 0; j < 3; j++) {
  scratch[j] = inp[i] * j;
}
out[i] = scratch[i % 4];
