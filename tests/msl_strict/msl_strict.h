// The Metal Shading Language surface our kernels use, declared for clang's C++ for OpenCL mode so
// that a syntax-only compile enforces what Apple's Metal compiler enforces: address spaces
// (`device`/`threadgroup`/`constant`/`thread` are OpenCL's `__global`/`__local`/`__constant`/
// `__private`, which never convert into one another), no `double` (fp64 is switched off by the
// compiler flags), and simdgroup matrix loads, stores and products whose element types must match
// exactly (templates deduce T from both sides; no conversions). Declarations only: nothing runs.
// Stands in for <metal_stdlib> plus MLX's utils.h, which MLX puts before every custom kernel.
#pragma OPENCL EXTENSION __cl_clang_non_portable_kernel_param_types : enable
#pragma OPENCL EXTENSION cl_khr_fp16 : enable

#define device __global
#define threadgroup __local
#define constant __constant
#define thread __private

// MLX's utils.h
#define MLX_MTL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")
#define MLX_MTL_LOOP_UNROLL _Pragma("clang loop unroll(full)")
#define MLX_MTL_CONST static constant constexpr const

// ---------------------------------------------------------------- scalar and vector types
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef __SIZE_TYPE__ size_t;
typedef int int32_t;
typedef uint uint32_t;
typedef long int64_t;
typedef ulong uint64_t;
typedef short int16_t;
typedef ushort uint16_t;
typedef char int8_t;
typedef uchar uint8_t;
typedef half float16_t;

struct bfloat {  // converts to and from float, as MLX's bfloat16_t
  ushort bits;
  bfloat() = default;
  bfloat(float value);
  operator float() const;
};
typedef bfloat bfloat16_t;

#define MSL_VECTORS(type)                                  \
  typedef type type##2 __attribute__((ext_vector_type(2))); \
  typedef type type##3 __attribute__((ext_vector_type(3))); \
  typedef type type##4 __attribute__((ext_vector_type(4)));
MSL_VECTORS(float)
MSL_VECTORS(half)
MSL_VECTORS(int)
MSL_VECTORS(uint)
MSL_VECTORS(short)
MSL_VECTORS(ushort)
MSL_VECTORS(char)
MSL_VECTORS(uchar)
MSL_VECTORS(ulong)
#undef MSL_VECTORS

namespace metal {

// ---------------------------------------------------------------- maths
#define MSL_UNARY(name) \
  float name(float x);  \
  half name(half x);
MSL_UNARY(abs)
MSL_UNARY(exp)
MSL_UNARY(exp2)
MSL_UNARY(log)
MSL_UNARY(log2)
MSL_UNARY(sqrt)
MSL_UNARY(rsqrt)
MSL_UNARY(tanh)
MSL_UNARY(sin)
MSL_UNARY(cos)
MSL_UNARY(floor)
MSL_UNARY(ceil)
#undef MSL_UNARY
bool isnan(float x);
bool isinf(float x);
#define MSL_BINARY(name)        \
  float name(float x, float y); \
  half name(half x, half y);    \
  int name(int x, int y);       \
  uint name(uint x, uint y);
MSL_BINARY(max)
MSL_BINARY(min)
#undef MSL_BINARY
float pow(float x, float y);
float fma(float a, float b, float c);
float precise_divide(float x, float y);

// ---------------------------------------------------------------- synchronisation
enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

// ---------------------------------------------------------------- SIMD-group functions
template <typename T>
T simd_sum(T value);
template <typename T>
T simd_max(T value);
template <typename T>
T simd_min(T value);
template <typename T>
T simd_prefix_exclusive_sum(T value);
template <typename T>
T simd_prefix_inclusive_sum(T value);
template <typename T>
T simd_shuffle(T value, ushort lane);
template <typename T>
T simd_shuffle_xor(T value, ushort mask);
template <typename T>
T simd_shuffle_down(T value, ushort delta);
template <typename T>
T simd_shuffle_up(T value, ushort delta);
template <typename T>
T simd_broadcast(T value, ushort lane);
bool simd_all(bool value);
bool simd_any(bool value);

// ---------------------------------------------------------------- SIMD-group matrices
template <typename T, int Rows, int Cols>
struct simdgroup_matrix {
  T elements[Rows * Cols / 32 + 1];  // opaque: a share of the matrix per lane
  typedef T lane_elements __attribute__((ext_vector_type(2)));
  thread lane_elements& thread_elements();  // this lane's two elements (MSL: vec<T, 2>)
};

template <typename T, int Rows, int Cols>
simdgroup_matrix<T, Rows, Cols> make_filled_simdgroup_matrix(T value);

// T is deduced from the matrix and from the pointer: a load or store between different element
// types matches no declaration, as in Metal.
#define MSL_MATRIX_MEMORY(space)                                                                   \
  template <typename T, int Rows, int Cols>                                                        \
  void simdgroup_load(thread simdgroup_matrix<T, Rows, Cols>& matrix, const space T* source,      \
                      ulong elements_per_row = Cols, ulong2 origin = 0, bool transpose = false);   \
  template <typename T, int Rows, int Cols>                                                        \
  void simdgroup_store(thread const simdgroup_matrix<T, Rows, Cols>& matrix, space T* destination, \
                       ulong elements_per_row = Cols, ulong2 origin = 0, bool transpose = false);
MSL_MATRIX_MEMORY(device)
MSL_MATRIX_MEMORY(threadgroup)
#undef MSL_MATRIX_MEMORY

template <typename T, int Rows, int Cols, int Inner>
void simdgroup_multiply(thread simdgroup_matrix<T, Rows, Cols>& d,
                        thread const simdgroup_matrix<T, Rows, Inner>& a,
                        thread const simdgroup_matrix<T, Inner, Cols>& b);
template <typename T, int Rows, int Cols, int Inner>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, Rows, Cols>& d,
                                   thread const simdgroup_matrix<T, Rows, Inner>& a,
                                   thread const simdgroup_matrix<T, Inner, Cols>& b,
                                   thread const simdgroup_matrix<T, Rows, Cols>& c);

}  // namespace metal

using namespace metal;
