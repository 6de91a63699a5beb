// Helper placed before the kernel (KernelSpec.header_file).
inline float twice(const device float* x, uint i) {
  return 2.0f * x[i];
}
