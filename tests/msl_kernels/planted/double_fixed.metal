// Correct twin of double.metal: float arithmetic. inp, out: [N] float
uint i = thread_position_in_grid.x;
float wide = static_cast<float>(inp[i]);
out[i] = wide * 2;
