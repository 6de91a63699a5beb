// Correct twin of recursion.h: the sum as a loop.
float sum_to(int n) {
  float sum = 0.0f;
  for (int k = 1; k <= n; ++k) {
    sum += k;
  }
  return sum;
}
