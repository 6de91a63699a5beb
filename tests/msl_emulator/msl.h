// The Metal Shading Language surface our kernels use, in C++20, for the MSL-on-CPU emulator.
//
// Scalar and vector types, address-space qualifiers (as empty macros: the Python rewriter turns
// `device T*` / `threadgroup T*` into checked `msl::ptr<T>` and threadgroup arrays into shared
// `msl::tarr`), metal:: maths, and the SIMD-group / threadgroup collectives, which suspend the
// calling fiber until the scheduler in runtime.cpp completes them for the whole group. Every access
// to threadgroup memory and to outputs is reported to the race detector in runtime.cpp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <source_location>
#include <type_traits>
#include <utility>

namespace msl {

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// A buffer or threadgroup allocation that checked pointers point into.
struct Region {
  char* begin;
  char* end;
  const char* name;
  const char* space;  // "device", "constant", "threadgroup"
  uint8_t* shadow;    // one byte per buffer byte, set on every mutable access (outputs only)
  bool output;        // a device buffer the kernel writes (accesses go to the race detector)
  // Device bytes the kernel asked of this buffer (launch counters): every input access is a
  // read; an output access is settled as a read or a write by the race detector.
  mutable uint64_t read_bytes = 0, written_bytes = 0;
  // When counting: per buffer byte, kTouchedRead | kTouchedWritten once any access read / wrote it.
  uint8_t* touched = nullptr;
};
constexpr uint8_t kTouchedRead = 1, kTouchedWritten = 2;
// Counts one device access of `size` bytes at `address`: requested bytes, and distinct ones.
inline void count_device_access(const Region* region, const char* address, size_t size,
                                bool wrote) {
  (wrote ? region->written_bytes : region->read_bytes) += size;
  if (!region->touched) return;
  const uint8_t how = wrote ? kTouchedWritten : kTouchedRead;
  for (uint8_t *t = region->touched + (address - region->begin), *end = t + size; t < end; t++)
    *t |= how;
}
const Region* find_region(const void* address);  // nullptr for thread-local memory
[[noreturn]] void out_of_bounds(const Region* region, const void* address, size_t element_size,
                                const char* kind);
// The race detector's hooks, called on every access to threadgroup memory or to an output. Never
// inlined: the return address is the access's place in the kernel (for the .metal line), which is
// why the accessors below are always inlined.
__attribute__((noinline)) void track_threadgroup(const void* address, size_t size);
__attribute__((noinline)) void track_output(const Region* region, const void* address, size_t size);
// The detector runs in the first thread orders only: for threadgroup memory it does not depend on
// the order (forward); for outputs, which record no reads, two threads that run between the same
// syncs run in both relative orders in forward and reverse (a read before another thread's write
// shows as a read after it in one of them).
inline bool detect_threadgroup_races = false;
inline bool detect_output_races = false;
inline char* arena_begin = nullptr;  // this threadgroup's memory
inline char* arena_end = nullptr;
constexpr size_t kTrackedBytes = 32;  // larger elements are not tracked

// ---------------------------------------------------------------- scalar types
using half = _Float16;

template <class U>
constexpr bool is_number = std::is_arithmetic_v<U> || std::is_same_v<U, _Float16>;

// bfloat16 as Metal and MLX round it: float bits, round to nearest even, NaN kept quiet.
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  static uint16_t round(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  template <class U, class = std::enable_if_t<is_number<U>>>
  bfloat(U value) : bits(round(float(value))) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// bfloat op bfloat -> bfloat; bfloat op integer -> bfloat; bfloat op floating -> that type.
template <class U>
using bf_result = std::conditional_t<std::is_integral_v<U> || std::is_same_v<U, bfloat>, bfloat,
                                     std::conditional_t<std::is_same_v<U, double>, double, float>>;
#define MSL_BF_OP(op)                                                                        \
  inline bfloat operator op(bfloat a, bfloat b) { return bfloat(float(a) op float(b)); }     \
  template <class U, class = std::enable_if_t<is_number<U>>>                                 \
  bf_result<U> operator op(bfloat a, U b) { return bf_result<U>(float(a) op b); }            \
  template <class U, class = std::enable_if_t<is_number<U>>>                                 \
  bf_result<U> operator op(U a, bfloat b) { return bf_result<U>(a op float(b)); }            \
  inline bfloat& operator op##=(bfloat& a, bfloat b) { return a = a op b; }                  \
  template <class U, class = std::enable_if_t<is_number<U>>>                                 \
  bfloat& operator op##=(bfloat& a, U b) { return a = bfloat(float(a) op b); }
MSL_BF_OP(+)
MSL_BF_OP(-)
MSL_BF_OP(*)
MSL_BF_OP(/)
#undef MSL_BF_OP
inline bfloat operator-(bfloat a) { return bfloat(-float(a)); }
#define MSL_BF_CMP(op)                                                                       \
  inline bool operator op(bfloat a, bfloat b) { return float(a) op float(b); }               \
  template <class U, class = std::enable_if_t<is_number<U>>>                                 \
  bool operator op(bfloat a, U b) { return float(a) op b; }                                  \
  template <class U, class = std::enable_if_t<is_number<U>>>                                 \
  bool operator op(U a, bfloat b) { return a op float(b); }
MSL_BF_CMP(<)
MSL_BF_CMP(>)
MSL_BF_CMP(<=)
MSL_BF_CMP(>=)
MSL_BF_CMP(==)
MSL_BF_CMP(!=)
#undef MSL_BF_CMP

// ---------------------------------------------------------------- vector types
#define MSL_VEC_BODY(N)                                                                      \
  static constexpr int size = N;                                                             \
  T& operator[](int i) { return v[i]; }                                                      \
  const T& operator[](int i) const { return v[i]; }                                          \
  template <class U>                                                                         \
  explicit vec(const vec<U, N>& o) { for (int i = 0; i < N; i++) v[i] = T(o.v[i]); }         \
  friend vec operator-(vec a) { for (int i = 0; i < N; i++) a.v[i] = -a.v[i]; return a; }
template <class T, int N>
struct vec;
template <class T>
struct vec<T, 2> {
  union { struct { T x, y; }; T v[2]; };
  vec() = default;
  vec(T s) : x(s), y(s) {}
  vec(T a, T b) : x(a), y(b) {}
  MSL_VEC_BODY(2)
};
template <class T>
struct vec<T, 3> {
  union { struct { T x, y, z; }; T v[3]; };
  vec() = default;
  vec(T s) : x(s), y(s), z(s) {}
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  vec(vec<T, 2> a, T c) : x(a.x), y(a.y), z(c) {}
  MSL_VEC_BODY(3)
};
template <class T>
struct vec<T, 4> {
  union { struct { T x, y, z, w; }; T v[4]; };
  vec() = default;
  vec(T s) : x(s), y(s), z(s), w(s) {}
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  vec(vec<T, 2> a, vec<T, 2> b) : x(a.x), y(a.y), z(b.x), w(b.y) {}
  vec(vec<T, 3> a, T d) : x(a.x), y(a.y), z(a.z), w(d) {}
  MSL_VEC_BODY(4)
};
#undef MSL_VEC_BODY

#define MSL_VEC_OP(op)                                                                       \
  template <class T, int N>                                                                  \
  vec<T, N> operator op(vec<T, N> a, const vec<T, N>& b) {                                   \
    for (int i = 0; i < N; i++) a.v[i] = a.v[i] op b.v[i];                                   \
    return a;                                                                                \
  }                                                                                          \
  template <class T, int N, class U, class = std::enable_if_t<is_number<U> || std::is_same_v<U, bfloat>>> \
  vec<T, N> operator op(vec<T, N> a, U b) { return a op vec<T, N>(T(b)); }                   \
  template <class T, int N, class U, class = std::enable_if_t<is_number<U> || std::is_same_v<U, bfloat>>> \
  vec<T, N> operator op(U a, const vec<T, N>& b) { return vec<T, N>(T(a)) op b; }            \
  template <class T, int N, class U>                                                         \
  vec<T, N>& operator op##=(vec<T, N>& a, const U& b) { return a = a op b; }
MSL_VEC_OP(+)
MSL_VEC_OP(-)
MSL_VEC_OP(*)
MSL_VEC_OP(/)
#undef MSL_VEC_OP

// ---------------------------------------------------------------- checked memory
// A `device` / `constant` / `threadgroup` pointer: every dereference is bounds-checked against
// the buffer it points into; mutable dereferences mark the output's shadow bytes as written.
// Accessors are always inlined so that the race detector's hooks see the kernel's .metal line.
#define MSL_INLINE __attribute__((always_inline)) inline
template <class T>
struct ptr {
  T* p = nullptr;
  const Region* region = nullptr;

  ptr() = default;
  ptr(std::nullptr_t) {}
  ptr(T* raw) : p(raw), region(find_region(raw)) {}
  ptr(T* raw, const Region* r) : p(raw), region(r) {}
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  ptr(const ptr<U>& o) : p(o.p), region(o.region) {}
  template <class U, class = std::enable_if_t<!std::is_same_v<const U, T> && !std::is_same_v<U, T>>,
            class = void>
  explicit ptr(const ptr<U>& o) : p(reinterpret_cast<T*>(o.p)), region(o.region) {}

  MSL_INLINE T* at(ptrdiff_t i) const {
    T* q = p + i;
    if (region) {
      const char* address = reinterpret_cast<const char*>(q);
      if (address < region->begin || address + sizeof(T) > region->end)
        out_of_bounds(region, q, sizeof(T), "pointer");
      if constexpr (!std::is_const_v<T>) {
        if (region->shadow)
          std::memset(region->shadow + (address - region->begin), 1, sizeof(T));
      }
      if (region->output) {
        if constexpr (sizeof(T) <= kTrackedBytes)
          if (detect_output_races) track_output(region, q, sizeof(T));
      } else if (region->begin >= arena_begin && region->begin < arena_end) {
        if constexpr (sizeof(T) <= kTrackedBytes)
          if (detect_threadgroup_races) track_threadgroup(q, sizeof(T));
      } else {
        count_device_access(region, address, sizeof(T), false);  // an input
      }
    }
    return q;
  }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  MSL_INLINE T& operator[](I i) const { return *at(ptrdiff_t(i)); }
  MSL_INLINE T& operator*() const { return *at(0); }
  MSL_INLINE T* operator->() const { return at(0); }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  ptr operator+(I i) const { return {p + ptrdiff_t(i), region}; }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  friend ptr operator+(I i, ptr a) { return a + i; }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  ptr operator-(I i) const { return {p - ptrdiff_t(i), region}; }
  ptrdiff_t operator-(const ptr& o) const { return p - o.p; }
  template <class I>
  ptr& operator+=(I i) { p += ptrdiff_t(i); return *this; }
  template <class I>
  ptr& operator-=(I i) { p -= ptrdiff_t(i); return *this; }
  ptr& operator++() { ++p; return *this; }
  ptr operator++(int) { ptr old = *this; ++p; return old; }
  ptr& operator--() { --p; return *this; }
  explicit operator bool() const { return p != nullptr; }
  bool operator==(const ptr& o) const { return p == o.p; }
  auto operator<=>(const ptr& o) const { return p <=> o.p; }
};

// A fixed-size array (threadgroup arrays, shared by the threadgroup, and thread-local arrays):
// same layout as T[N], bounds-checked indexing; elements in threadgroup memory are tracked (the
// rows of a multi-dimensional array are not elements).
template <class T, size_t N>
struct tarr;
template <class T>
constexpr bool is_tarr = false;
template <class T, size_t N>
constexpr bool is_tarr<tarr<T, N>> = true;

template <class T, size_t N>
struct tarr {
  T v[N];
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  MSL_INLINE T& operator[](I i) {
    if (i < 0 || size_t(i) >= N) out_of_bounds(find_region(v), v + ptrdiff_t(i), sizeof(T), "array");
    if constexpr (!is_tarr<T> && sizeof(T) <= kTrackedBytes) {
      const char* address = reinterpret_cast<const char*>(v + i);
      if (detect_threadgroup_races && address >= arena_begin && address < arena_end)
        track_threadgroup(address, sizeof(T));
    }
    return v[i];
  }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  MSL_INLINE const T& operator[](I i) const { return const_cast<tarr&>(*this)[i]; }
  operator ptr<T>() { return {v, find_region(v)}; }
  operator ptr<const T>() const { return {v, find_region(v)}; }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  ptr<T> operator+(I i) { return ptr<T>(*this) + i; }
};

// Fills uninitialised memory with this thread order's poison byte.
void poison(void* memory, size_t bytes);

// Threadgroup variables, one allocation per declaration per threadgroup, poisoned.
void* threadgroup_alloc(int slot, size_t bytes, const char* name);
template <class T>
T& threadgroup_var(int slot, const char* name) {
  return *static_cast<T*>(threadgroup_alloc(slot, sizeof(T), name));
}

// ---------------------------------------------------------------- scheduling hooks
using Site = std::source_location;
#define MSL_SITE msl::Site site = msl::Site::current()
// The calling fiber waits until every lane of its SIMD group reaches the same collective, then
// `combine(args_of_each_lane, lanes)` runs once for the group.
using Combine = void (*)(void** lane_args, int lanes);
void simd_collective(const Site& site, const char* op, void* args, Combine combine);
void count_matrix_product();  // the launch counters' 8 x 8 simdgroup matrix products
void threadgroup_sync(const Site& site, unsigned flags);
int lane_id();
int simd_width();  // lanes in this SIMD group (32 unless the threadgroup is smaller)

}  // namespace msl

// ---------------------------------------------------------------- MSL names
using half = msl::half;
using bfloat = msl::bfloat;
using float16_t = msl::half;
using bfloat16_t = msl::bfloat;
using uint = uint32_t;
using ushort = uint16_t;
using uchar = uint8_t;
using ulong = uint64_t;
#define MSL_VEC_NAMES(T, name) \
  using name##2 = msl::vec<T, 2>;  \
  using name##3 = msl::vec<T, 3>;  \
  using name##4 = msl::vec<T, 4>;
MSL_VEC_NAMES(float, float)
MSL_VEC_NAMES(msl::half, half)
MSL_VEC_NAMES(msl::bfloat, bfloat)
MSL_VEC_NAMES(int, int)
MSL_VEC_NAMES(uint32_t, uint)
MSL_VEC_NAMES(int16_t, short)
MSL_VEC_NAMES(uint16_t, ushort)
MSL_VEC_NAMES(uint64_t, ulong)
MSL_VEC_NAMES(bool, bool)
#undef MSL_VEC_NAMES

namespace msl {
// The values of the kernel's attribute parameters ([[thread_position_in_grid]] ...) for a thread.
struct Attrs {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid,
      threads_per_threadgroup, threadgroups_per_grid, threads_per_grid,
      dispatch_threads_per_threadgroup, grid_size, grid_origin;
  uint thread_index_in_simdgroup, simdgroup_index_in_threadgroup, threads_per_simdgroup,
      thread_index_in_threadgroup, simdgroups_per_threadgroup, thread_execution_width,
      dispatch_simdgroups_per_threadgroup, quadgroup_index_in_threadgroup,
      thread_index_in_quadgroup, quadgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};
}  // namespace msl

#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define MAXFLOAT 3.40282347e+38F
#define FLT_MAX 3.40282347e+38F
#define FLT_MIN 1.17549435e-38F
#define HUGE_VALF __builtin_huge_valf()
#define M_PI_F 3.14159265358979323846264338327950288f
#define M_LN2_F 0.693147180559945309417232121458176568f
#define M_LOG2E_F 1.44269504088896340735992468100189214f

namespace metal {
using msl::vec;
template <class T>
using numeric_limits = std::numeric_limits<T>;

enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }

template <class To, class From>
To as_type(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

namespace detail {
// Floating-point maths in float; half and bfloat round the float result (the GPU's own half
// arithmetic may round intermediate steps differently).
#define MSL_UNARY(name, expr)                                                                \
  inline float name(float x) { return expr; }                                                \
  inline msl::half name(msl::half x) { return msl::half(name(float(x))); }                   \
  inline msl::bfloat name(msl::bfloat x) { return msl::bfloat(name(float(x))); }             \
  template <class T, int N>                                                                  \
  vec<T, N> name(vec<T, N> a) {                                                              \
    for (int i = 0; i < N; i++) a.v[i] = name(a.v[i]);                                       \
    return a;                                                                                \
  }
MSL_UNARY(exp, __builtin_expf(x))
MSL_UNARY(exp2, __builtin_exp2f(x))
MSL_UNARY(exp10, __builtin_powf(10.0f, x))
MSL_UNARY(log, __builtin_logf(x))
MSL_UNARY(log2, __builtin_log2f(x))
MSL_UNARY(log10, __builtin_log10f(x))
MSL_UNARY(sqrt, __builtin_sqrtf(x))
MSL_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
MSL_UNARY(sin, __builtin_sinf(x))
MSL_UNARY(cos, __builtin_cosf(x))
MSL_UNARY(tan, __builtin_tanf(x))
MSL_UNARY(tanh, __builtin_tanhf(x))
MSL_UNARY(sinh, __builtin_sinhf(x))
MSL_UNARY(cosh, __builtin_coshf(x))
MSL_UNARY(atan, __builtin_atanf(x))
MSL_UNARY(asin, __builtin_asinf(x))
MSL_UNARY(acos, __builtin_acosf(x))
MSL_UNARY(fabs, __builtin_fabsf(x))
MSL_UNARY(abs, __builtin_fabsf(x))
MSL_UNARY(floor, __builtin_floorf(x))
MSL_UNARY(ceil, __builtin_ceilf(x))
MSL_UNARY(round, __builtin_roundf(x))
MSL_UNARY(rint, __builtin_rintf(x))
MSL_UNARY(trunc, __builtin_truncf(x))
MSL_UNARY(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
MSL_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
MSL_UNARY(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x != x ? 0.0f : x)))
MSL_UNARY(erf, __builtin_erff(x))
MSL_UNARY(log1p, __builtin_log1pf(x))
MSL_UNARY(expm1, __builtin_expm1f(x))
#undef MSL_UNARY

#define MSL_BINARY(name, expr)                                                               \
  inline float name(float x, float y) { return expr; }                                       \
  inline msl::half name(msl::half x, msl::half y) { return msl::half(name(float(x), float(y))); } \
  inline msl::bfloat name(msl::bfloat x, msl::bfloat y) {                                    \
    return msl::bfloat(name(float(x), float(y)));                                            \
  }                                                                                          \
  template <class T, int N>                                                                  \
  vec<T, N> name(vec<T, N> a, const vec<T, N>& b) {                                          \
    for (int i = 0; i < N; i++) a.v[i] = name(a.v[i], b.v[i]);                               \
    return a;                                                                                \
  }
MSL_BINARY(pow, __builtin_powf(x, y))
MSL_BINARY(powr, __builtin_powf(x, y))
MSL_BINARY(fmin, __builtin_fminf(x, y))
MSL_BINARY(fmax, __builtin_fmaxf(x, y))
MSL_BINARY(fmod, __builtin_fmodf(x, y))
MSL_BINARY(atan2, __builtin_atan2f(x, y))
MSL_BINARY(copysign, __builtin_copysignf(x, y))
MSL_BINARY(step, y < x ? 0.0f : 1.0f)
MSL_BINARY(divide, x / y)
#undef MSL_BINARY

// min/max/clamp as Metal defines them for floats (fmin/fmax) and for integers.
#define MSL_MINMAX(T)                                                                        \
  inline T min(T x, T y) { return y < x ? y : x; }                                           \
  inline T max(T x, T y) { return x < y ? y : x; }                                           \
  inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
MSL_MINMAX(int)
MSL_MINMAX(uint32_t)
MSL_MINMAX(int16_t)
MSL_MINMAX(uint16_t)
MSL_MINMAX(int64_t)
MSL_MINMAX(uint64_t)
#undef MSL_MINMAX
inline float min(float x, float y) { return __builtin_fminf(x, y); }
inline float max(float x, float y) { return __builtin_fmaxf(x, y); }
inline float clamp(float x, float lo, float hi) { return min(max(x, lo), hi); }
inline msl::half min(msl::half x, msl::half y) { return msl::half(min(float(x), float(y))); }
inline msl::half max(msl::half x, msl::half y) { return msl::half(max(float(x), float(y))); }
inline msl::half clamp(msl::half x, msl::half lo, msl::half hi) { return min(max(x, lo), hi); }
inline msl::bfloat min(msl::bfloat x, msl::bfloat y) { return msl::bfloat(min(float(x), float(y))); }
inline msl::bfloat max(msl::bfloat x, msl::bfloat y) { return msl::bfloat(max(float(x), float(y))); }
inline msl::bfloat clamp(msl::bfloat x, msl::bfloat lo, msl::bfloat hi) { return min(max(x, lo), hi); }
inline int abs(int x) { return x < 0 ? -x : x; }
template <class T, int N>
vec<T, N> min(vec<T, N> a, const vec<T, N>& b) {
  for (int i = 0; i < N; i++) a.v[i] = min(a.v[i], b.v[i]);
  return a;
}
template <class T, int N>
vec<T, N> max(vec<T, N> a, const vec<T, N>& b) {
  for (int i = 0; i < N; i++) a.v[i] = max(a.v[i], b.v[i]);
  return a;
}
template <class T, int N>
vec<T, N> clamp(vec<T, N> a, const vec<T, N>& lo, const vec<T, N>& hi) { return min(max(a, lo), hi); }

inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline msl::half fma(msl::half a, msl::half b, msl::half c) { return msl::half(fma(float(a), float(b), float(c))); }
inline msl::bfloat fma(msl::bfloat a, msl::bfloat b, msl::bfloat c) { return msl::bfloat(fma(float(a), float(b), float(c))); }
template <class T, int N>
vec<T, N> fma(vec<T, N> a, const vec<T, N>& b, const vec<T, N>& c) {
  for (int i = 0; i < N; i++) a.v[i] = fma(a.v[i], b.v[i], c.v[i]);
  return a;
}
template <class T>
T mix(T x, T y, T a) { return x + (y - x) * a; }
template <class T>
T select(T a, T b, bool c) { return c ? b : a; }
inline bool isnan(float x) { return x != x; }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }
template <class T, int N>
T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = a.v[0] * b.v[0];
  for (int i = 1; i < N; i++) s += a.v[i] * b.v[i];
  return s;
}
template <class T, int N>
T length(const vec<T, N>& a) { return sqrt(dot(a, a)); }
}  // namespace detail

using namespace detail;
namespace fast { using namespace detail; }
namespace precise { using namespace detail; }

// ---------------------------------------------------------------- synchronisation
inline void threadgroup_barrier(mem_flags flags, MSL_SITE) {
  msl::threadgroup_sync(site, unsigned(flags));
}
inline void simdgroup_barrier(mem_flags, MSL_SITE) {
  msl::simd_collective(site, "simdgroup_barrier", nullptr, [](void**, int) {});
}

// ---------------------------------------------------------------- SIMD-group functions
namespace simd {
template <class T>
struct Lane { T in; T out; uint32_t arg; };

template <class T, class F>
T reduce(const msl::Site& site, const char* op, T x, F) {
  Lane<T> lane{x, x, 0};
  msl::simd_collective(site, op, &lane, [](void** args, int n) {
    T acc = static_cast<Lane<T>*>(args[0])->in;
    for (int i = 1; i < n; i++) acc = F{}(acc, static_cast<Lane<T>*>(args[i])->in);
    for (int i = 0; i < n; i++) static_cast<Lane<T>*>(args[i])->out = acc;
  });
  return lane.out;
}
template <class T, class F, bool Inclusive>
T prefix(const msl::Site& site, const char* op, T x, T identity, F) {
  Lane<T> lane{x, identity, 0};
  msl::simd_collective(site, op, &lane, [](void** args, int n) {
    T acc = static_cast<Lane<T>*>(args[0])->out;  // the identity
    for (int i = 0; i < n; i++) {
      auto* l = static_cast<Lane<T>*>(args[i]);
      if (!Inclusive) l->out = acc;
      acc = F{}(acc, l->in);
      if (Inclusive) l->out = acc;
    }
  });
  return lane.out;
}
// Lane `source(i, arg, n)` of the group; -1 keeps the lane's own value (shuffle_down/up edges).
template <class T, int Kind>
T exchange(const msl::Site& site, const char* op, T x, uint32_t arg) {
  Lane<T> lane{x, x, arg};
  msl::simd_collective(site, op, &lane, [](void** args, int n) {
    for (int i = 0; i < n; i++) {
      auto* l = static_cast<Lane<T>*>(args[i]);
      long from = Kind == 0 ? long(l->arg)                    // shuffle / broadcast
                  : Kind == 1 ? long(i) + l->arg            // shuffle_down
                  : Kind == 2 ? long(i) - long(l->arg)      // shuffle_up
                  : Kind == 3 ? long(i ^ l->arg)            // shuffle_xor
                  : Kind == 4 ? long((i + l->arg) % n)      // rotate_down
                              : long((i + n - l->arg % n) % n);  // rotate_up
      if ((Kind == 1 || Kind == 2) && (from < 0 || from >= n)) from = i;
      if (from < 0 || from >= n)
        msl::fail("SIMD lane %d reads lane %ld, outside its SIMD group of %d lanes", i, from, n);
      l->out = static_cast<Lane<T>*>(args[from])->in;
    }
  });
  return lane.out;
}
struct Add { template <class T> T operator()(T a, T b) const { return a + b; } };
struct Mul { template <class T> T operator()(T a, T b) const { return a * b; } };
struct Max { template <class T> T operator()(T a, T b) const { return max(a, b); } };
struct Min { template <class T> T operator()(T a, T b) const { return min(a, b); } };
struct And { template <class T> T operator()(T a, T b) const { return a & b; } };
struct Or { template <class T> T operator()(T a, T b) const { return a | b; } };
struct Xor { template <class T> T operator()(T a, T b) const { return a ^ b; } };
}  // namespace simd

template <class T> T simd_sum(T x, MSL_SITE) { return simd::reduce(site, "simd_sum", x, simd::Add{}); }
template <class T> T simd_product(T x, MSL_SITE) { return simd::reduce(site, "simd_product", x, simd::Mul{}); }
template <class T> T simd_max(T x, MSL_SITE) { return simd::reduce(site, "simd_max", x, simd::Max{}); }
template <class T> T simd_min(T x, MSL_SITE) { return simd::reduce(site, "simd_min", x, simd::Min{}); }
template <class T> T simd_and(T x, MSL_SITE) { return simd::reduce(site, "simd_and", x, simd::And{}); }
template <class T> T simd_or(T x, MSL_SITE) { return simd::reduce(site, "simd_or", x, simd::Or{}); }
template <class T> T simd_xor(T x, MSL_SITE) { return simd::reduce(site, "simd_xor", x, simd::Xor{}); }
inline bool simd_all(bool x, MSL_SITE) { return simd::reduce(site, "simd_all", x, simd::And{}); }
inline bool simd_any(bool x, MSL_SITE) { return simd::reduce(site, "simd_any", x, simd::Or{}); }
template <class T> T simd_prefix_inclusive_sum(T x, MSL_SITE) {
  return simd::prefix<T, simd::Add, true>(site, "simd_prefix_inclusive_sum", x, T(0), {});
}
template <class T> T simd_prefix_exclusive_sum(T x, MSL_SITE) {
  return simd::prefix<T, simd::Add, false>(site, "simd_prefix_exclusive_sum", x, T(0), {});
}
template <class T> T simd_prefix_inclusive_product(T x, MSL_SITE) {
  return simd::prefix<T, simd::Mul, true>(site, "simd_prefix_inclusive_product", x, T(1), {});
}
template <class T> T simd_prefix_exclusive_product(T x, MSL_SITE) {
  return simd::prefix<T, simd::Mul, false>(site, "simd_prefix_exclusive_product", x, T(1), {});
}
template <class T> T simd_shuffle(T x, uint16_t lane, MSL_SITE) {
  return simd::exchange<T, 0>(site, "simd_shuffle", x, lane);
}
template <class T> T simd_broadcast(T x, uint16_t lane, MSL_SITE) {
  return simd::exchange<T, 0>(site, "simd_broadcast", x, lane);
}
template <class T> T simd_broadcast_first(T x, MSL_SITE) {
  return simd::exchange<T, 0>(site, "simd_broadcast_first", x, 0);
}
template <class T> T simd_shuffle_down(T x, uint16_t delta, MSL_SITE) {
  return simd::exchange<T, 1>(site, "simd_shuffle_down", x, delta);
}
template <class T> T simd_shuffle_up(T x, uint16_t delta, MSL_SITE) {
  return simd::exchange<T, 2>(site, "simd_shuffle_up", x, delta);
}
template <class T> T simd_shuffle_xor(T x, uint16_t mask, MSL_SITE) {
  return simd::exchange<T, 3>(site, "simd_shuffle_xor", x, mask);
}
template <class T> T simd_shuffle_rotate_down(T x, uint16_t delta, MSL_SITE) {
  return simd::exchange<T, 4>(site, "simd_shuffle_rotate_down", x, delta);
}
template <class T> T simd_shuffle_rotate_up(T x, uint16_t delta, MSL_SITE) {
  return simd::exchange<T, 5>(site, "simd_shuffle_rotate_up", x, delta);
}

// ---------------------------------------------------------------- simdgroup_matrix (8x8)
// Each lane holds two elements of row `row(lane)`, columns `col(lane)` and `col(lane) + 1`: the
// layout Apple GPUs use (as MLX's steel kernels read it through thread_elements()).
namespace sgm {
inline int row(int lane) { return ((lane / 4) & 4) + ((lane / 2) % 4); }
inline int col(int lane) { return ((lane / 4) & 2) * 2 + (lane % 2) * 2; }
}  // namespace sgm

template <class T, int Rows, int Cols>
struct simdgroup_matrix {
  static_assert(Rows == 8 && Cols == 8, "the emulator supports 8x8 simdgroup_matrix only");
  vec<T, 2> elements;
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diagonal) {  // Metal: a diagonal matrix
    int lane = msl::lane_id(), r = sgm::row(lane), c = sgm::col(lane);
    elements = vec<T, 2>(r == c ? diagonal : T(0), r == c + 1 ? diagonal : T(0));
  }
  vec<T, 2>& thread_elements() { return elements; }
};
using simdgroup_float8x8 = simdgroup_matrix<float, 8, 8>;
using simdgroup_half8x8 = simdgroup_matrix<msl::half, 8, 8>;
using simdgroup_bfloat8x8 = simdgroup_matrix<msl::bfloat, 8, 8>;

template <class T, int R, int C>
simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, R, C> m;
  m.elements = vec<T, 2>(value);
  return m;
}

namespace sgm {
inline void converge(const msl::Site& site, const char* op) {
  if (msl::simd_width() != 32) msl::fail("%s needs a full SIMD group of 32 lanes", op);
  msl::simd_collective(site, op, nullptr, [](void**, int) {});
}
// Memory index of matrix element (r, c) with Metal's origin (column, row) and optional transpose.
inline long index(int r, int c, unsigned long stride, vec<unsigned long, 2> origin, bool transpose) {
  return transpose ? long((origin.y + c) * stride + origin.x + r)
                   : long((origin.y + r) * stride + origin.x + c);
}
}  // namespace sgm

namespace sgm {
// MSL declares simdgroup_load / simdgroup_store for a pointer to the matrix's own element type
// only: `Memory` (a checked pointer, a thread pointer, or a threadgroup array, taken by reference
// so that it is not copied) must hold T exactly.
template <class T, class Memory>
constexpr void require_element_type() {
  using Element = std::remove_cvref_t<decltype(std::declval<Memory&>()[0])>;
  static_assert(std::is_same_v<Element, T>,
                "simdgroup_load/simdgroup_store: the pointer's element type differs from the "
                "matrix's (MSL has no converting overload; convert the data first)");
}
}  // namespace sgm

template <class T, class Memory>
MSL_INLINE void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, Memory&& source,
                               unsigned long elements_per_row = 8,
                               vec<unsigned long, 2> origin = vec<unsigned long, 2>(0ul),
                               bool transpose = false, MSL_SITE) {
  sgm::require_element_type<T, Memory>();
  sgm::converge(site, "simdgroup_load");
  int lane = msl::lane_id(), r = sgm::row(lane), c = sgm::col(lane);
  for (int j = 0; j < 2; j++)
    m.elements[j] = source[sgm::index(r, c + j, elements_per_row, origin, transpose)];
}

template <class T, class Memory>
MSL_INLINE void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, Memory&& destination,
                                unsigned long elements_per_row = 8,
                                vec<unsigned long, 2> origin = vec<unsigned long, 2>(0ul),
                                bool transpose = false, MSL_SITE) {
  sgm::require_element_type<T, Memory>();
  sgm::converge(site, "simdgroup_store");
  int lane = msl::lane_id(), r = sgm::row(lane), c = sgm::col(lane);
  for (int j = 0; j < 2; j++)
    destination[sgm::index(r, c + j, elements_per_row, origin, transpose)] = m.elements[j];
}

namespace sgm {
template <class T>
struct Mma { simdgroup_matrix<T, 8, 8>* d; const simdgroup_matrix<T, 8, 8>* a;
             const simdgroup_matrix<T, 8, 8>* b; const simdgroup_matrix<T, 8, 8>* c; };

// D = A * B (+ C when given), products and sums in float, the result rounded to T once.
template <class T>
void multiply_accumulate(const msl::Site& site, const char* op, simdgroup_matrix<T, 8, 8>& d,
                         const simdgroup_matrix<T, 8, 8>& a, const simdgroup_matrix<T, 8, 8>& b,
                         const simdgroup_matrix<T, 8, 8>* c) {
  using Args = Mma<T>;
  if (msl::simd_width() != 32) msl::fail("%s needs a full SIMD group of 32 lanes", op);
  Args args{&d, &a, &b, c};
  msl::simd_collective(site, op, &args, [](void** lanes, int) {
    msl::count_matrix_product();
    float A[8][8], B[8][8], C[8][8];
    for (int l = 0; l < 32; l++) {
      auto* x = static_cast<Args*>(lanes[l]);
      int r = sgm::row(l), c0 = sgm::col(l);
      for (int j = 0; j < 2; j++) {
        A[r][c0 + j] = float(x->a->elements[j]);
        B[r][c0 + j] = float(x->b->elements[j]);
        C[r][c0 + j] = x->c ? float(x->c->elements[j]) : 0.0f;
      }
    }
    for (int l = 0; l < 32; l++) {
      auto* x = static_cast<Args*>(lanes[l]);
      int r = sgm::row(l), c0 = sgm::col(l);
      for (int j = 0; j < 2; j++) {
        float acc = C[r][c0 + j];
        for (int k = 0; k < 8; k++) acc += A[r][k] * B[k][c0 + j];
        x->d->elements[j] = T(acc);
      }
    }
  });
}
}  // namespace sgm

// One element type T across d, a, b (and c), deduced from each: MSL has no mixed-type overload.
template <class T>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                                   const simdgroup_matrix<T, 8, 8>& b,
                                   const simdgroup_matrix<T, 8, 8>& c, MSL_SITE) {
  sgm::multiply_accumulate(site, "simdgroup_multiply_accumulate", d, a, b, &c);
}
template <class T>
void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                        const simdgroup_matrix<T, 8, 8>& b, MSL_SITE) {
  sgm::multiply_accumulate(site, "simdgroup_multiply", d, a, b,
                           static_cast<const simdgroup_matrix<T, 8, 8>*>(nullptr));
}
}  // namespace metal

using namespace metal;

// ---------------------------------------------------------------- kernel code only
// What follows binds the kernel code after this header, not runtime.cpp (which defines
// MSL_EMULATOR_RUNTIME before including it).
#ifndef MSL_EMULATOR_RUNTIME
// Address-space qualifiers left after the rewrite (references, thread pointers) carry no meaning
// on the CPU; defined last so that no system header sees them.
#define device
#define constant
#define thread
#define threadgroup

// MLX's utils.h, which MLX puts before every custom kernel. The unroll pragma is g++'s (and
// clang's) spelling of `clang loop unroll(full)`, with the same rule: a loop must follow it.
#define MLX_MTL_PRAGMA_UNROLL _Pragma("GCC unroll 65534")
#define MLX_MTL_LOOP_UNROLL _Pragma("GCC unroll 65534")
#define MLX_MTL_CONST static constant constexpr const

// Metal has no 64-bit floating point: any `double` in kernel code is a compile error.
#pragma GCC poison double
#endif
