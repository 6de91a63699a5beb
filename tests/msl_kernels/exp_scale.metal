// out = exp(inp) * scale, elementwise.
// inp: [N] T, scale: [] float, out: [N] T
uint i = thread_position_in_grid.x;
if (i >= inp_shape[0]) {
  return;
}
out[i] = T(metal::exp(float(inp[i])) * scale);
