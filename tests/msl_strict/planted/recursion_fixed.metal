// Correct twin of recursion.metal: calls recursion_fixed.h's loop. inp, out: [64] T
uint i = thread_position_in_grid.x;
out[i] = static_cast<float>(inp[i]) + sum_to(i);
