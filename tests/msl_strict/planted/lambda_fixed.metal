// Correct twin of lambda.metal: the expression written out. inp, out: [64] T
uint i = thread_position_in_grid.x;
out[i] = 2 * static_cast<float>(inp[i]);
