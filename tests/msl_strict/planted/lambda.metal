// Planted: a lambda (Metal has none). inp, out: [64] T
uint i = thread_position_in_grid.x;
auto twice = [](float x) { return 2 * x; };
out[i] = twice(static_cast<float>(inp[i]));
