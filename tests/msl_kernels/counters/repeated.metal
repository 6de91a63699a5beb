// Repeated device traffic with known counts: thread i reads table[i % W] R times and stores its
// running sum to out[i] after each read (R writes of one element).
// table: [W] float; out: [N] float
uint i = thread_position_in_grid.x;
float sum = 0.0f;
for (int r = 0; r < R; ++r) {
  sum += table[i % W];
  out[i] = sum;
}
