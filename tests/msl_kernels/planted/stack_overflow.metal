// Planted bug: a thread-local array larger than any thread's stack; the emulator must report the
// crash instead of taking the test process down.
// inp: [N] float, out: [N] float
uint i = thread_position_in_grid.x;
thread float scratch[200000];
volatile uint at = i * 1000;
scratch[at] = inp[i];
out[i] = scratch[at];
