// Planted: calls recursion.h's recursive sum_to. inp, out: [64] T
uint i = thread_position_in_grid.x;
out[i] = static_cast<float>(inp[i]) + sum_to(i);
