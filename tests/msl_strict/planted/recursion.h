// Planted: a recursive function (Metal has no recursion).
float sum_to(int n) {
  return n == 0 ? 0.0f : n + sum_to(n - 1);
}
