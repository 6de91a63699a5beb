// Device traffic with known counts: every thread reads inp[i] and idx[i] once; the first M
// threads write out[i] once.
// inp: [N] float, idx: [N] half, out: [M] float
uint i = thread_position_in_grid.x;
const float x = inp[i] + float(idx[i]);
if (i < M) {
  out[i] = x;
}
