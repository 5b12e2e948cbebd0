// Metal Shading Language on the CPU, for running the bodies of `mx.fast.metal_kernel` kernels
// on Linux in tests. metal_kernels/emulator.py generates the kernel's signature exactly as MLX
// does, drops the [[...]] attributes and calls the kernel through emu::launch.
//
// Execution model:
//   - every thread of a threadgroup is a real std::thread; threadgroups run one after another
//     with the same worker threads (grid and threadgroup sizes as in dispatchThreads, edge
//     threadgroups cut to the grid);
//   - threadgroup_barrier is a barrier over the threads of the threadgroup;
//   - simd_* collectives are barriers over the (up to) 32 lanes of a simdgroup that exchange
//     values through a shared, double-buffered scratch: every lane of a simdgroup must reach
//     them the same number of times (simdgroup-uniform control flow), as on the GPU;
//   - `threadgroup` declarations become `static` locals: one buffer shared by the threads of
//     the one threadgroup running at a time. So `threadgroup` is valid on declarations in the
//     kernel body only, not on pointer parameters of helpers;
//   - a barrier that is not reached by every thread within the launch timeout aborts the launch
//     with an error (divergent control flow around a barrier deadlocks on a GPU, too);
//   - optional jitter (a seed != 0) sleeps threads at random before barriers and collectives to
//     shake out missing barriers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// ---- scalar and vector types ------------------------------------------------------------
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;
typedef _Float16 float16_t;

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) {  // round to nearest even, as MLX and the GPU do
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat bfloat16_t;

template <typename T, int N>
struct vec;

#define EMU_VEC_OPS(N)                                                        \
  T& operator[](int i) { return (&x)[i]; }                                    \
  const T& operator[](int i) const { return (&x)[i]; }                        \
  friend vec operator+(vec a, const vec& b) {                                 \
    for (int i = 0; i < N; i++) a[i] += b[i];                                 \
    return a;                                                                 \
  }                                                                           \
  friend vec operator-(vec a, const vec& b) {                                 \
    for (int i = 0; i < N; i++) a[i] -= b[i];                                 \
    return a;                                                                 \
  }                                                                           \
  friend vec operator*(vec a, const vec& b) {                                 \
    for (int i = 0; i < N; i++) a[i] *= b[i];                                 \
    return a;                                                                 \
  }                                                                           \
  friend vec operator*(vec a, T s) {                                          \
    for (int i = 0; i < N; i++) a[i] *= s;                                    \
    return a;                                                                 \
  }                                                                           \
  friend vec operator*(T s, vec a) { return a * s; }                          \
  vec& operator+=(const vec& b) { return *this = *this + b; }                 \
  vec& operator*=(const vec& b) { return *this = *this * b; }                 \
  vec& operator*=(T s) { return *this = *this * s; }

template <typename T>
struct vec<T, 2> {
  T x, y;
  EMU_VEC_OPS(2)
};
template <typename T>
struct vec<T, 3> {
  T x, y, z;
  EMU_VEC_OPS(3)
};
template <typename T>
struct vec<T, 4> {
  T x, y, z, w;
  EMU_VEC_OPS(4)
};
#undef EMU_VEC_OPS

#define EMU_VEC_TYPEDEFS(T, name) \
  typedef vec<T, 2> name##2;      \
  typedef vec<T, 3> name##3;      \
  typedef vec<T, 4> name##4;
EMU_VEC_TYPEDEFS(float, float)
EMU_VEC_TYPEDEFS(half, half)
EMU_VEC_TYPEDEFS(int, int)
EMU_VEC_TYPEDEFS(uint, uint)
EMU_VEC_TYPEDEFS(short, short)
EMU_VEC_TYPEDEFS(ushort, ushort)
#undef EMU_VEC_TYPEDEFS

// ---- the runtime interface (metal_emu_runtime.cpp, compiled once) ---------------------
namespace emu {

constexpr int kSimdWidth = 32;

// Thread attributes of [[...]] kernel parameters; names as in the Metal specification.
struct Attrs {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid, grid_size, grid_origin;
  uint3 dispatch_threads_per_threadgroup;
  uint thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup;
  uint simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
  uint quadgroup_index_in_threadgroup, thread_index_in_quadgroup, quadgroups_per_threadgroup;
  uint dispatch_simdgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};

// What a lane sees after a simdgroup exchange: the values every lane published.
struct SimdLanes {
  const unsigned char (*values)[16];
  int width;  // active lanes of this simdgroup
  int lane;   // the calling lane
};

// Publish `size` bytes of the calling lane and wait for all lanes of its simdgroup.
SimdLanes simd_exchange(const void* value, int size);
void threadgroup_barrier();

using KernelEntry = void (*)(const Attrs&, void* context);
// Runs `entry` over the grid like dispatchThreads(grid, threadgroup); 0, or -1 and `error`.
int launch(const uint32_t grid[3], const uint32_t group[3], uint32_t jitter_seed, double timeout_s,
           char* error, int error_len, KernelEntry entry, void* context);

template <typename V, typename F>
auto collective(const V& value, F combine) {
  static_assert(sizeof(V) <= 16, "simdgroup value too large");
  const SimdLanes lanes = simd_exchange(&value, int(sizeof(V)));
  auto lane_value = [&](int i) {
    V v;
    std::memcpy(&v, lanes.values[i], sizeof(V));
    return v;
  };
  return combine(lane_value, lanes.width, lanes.lane);
}

}  // namespace emu

// ---- the metal:: namespace --------------------------------------------------------------
namespace metal {

template <typename T>
using numeric_limits = std::numeric_limits<T>;

enum class mem_flags : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }

inline void threadgroup_barrier(mem_flags) { emu::threadgroup_barrier(); }

// Scalar math. half and bfloat compute in float, as Metal does for bfloat.
#define EMU_UNARY(name, impl)                                              \
  inline float name(float x) { return impl(x); }                           \
  inline half name(half x) { return half(impl(float(x))); }                \
  inline bfloat name(bfloat x) { return bfloat(impl(float(x))); }
EMU_UNARY(exp, std::exp)
EMU_UNARY(exp2, std::exp2)
EMU_UNARY(log, std::log)
EMU_UNARY(sqrt, std::sqrt)
EMU_UNARY(tanh, std::tanh)
EMU_UNARY(abs, std::fabs)
EMU_UNARY(floor, std::floor)
EMU_UNARY(ceil, std::ceil)
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
#undef EMU_UNARY

template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }

namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
}  // namespace precise

// SIMD-group functions (MSL 6.9.2). Lanes of an edge simdgroup beyond `width` do not exist.
template <typename T, typename Op>
T simd_reduce(T x, Op op) {  // lane 0 op lane 1 op ... op lane width-1, on every lane
  return emu::collective(x, [op](auto lane, int width, int) {
    T acc = lane(0);
    for (int i = 1; i < width; i++) acc = op(acc, lane(i));
    return acc;
  });
}
template <typename T>
T simd_sum(T x) { return simd_reduce(x, [](T a, T b) { return a + b; }); }
template <typename T>
T simd_max(T x) { return simd_reduce(x, [](T a, T b) { return max(a, b); }); }
template <typename T>
T simd_min(T x) { return simd_reduce(x, [](T a, T b) { return min(a, b); }); }
template <typename T>
T simd_prefix_exclusive_sum(T x) {
  return emu::collective(x, [](auto lane, int, int self) {
    T acc = T(0);
    for (int i = 0; i < self; i++) acc = acc + lane(i);
    return acc;
  });
}
template <typename T>
T simd_prefix_inclusive_sum(T x) { return simd_prefix_exclusive_sum(x) + x; }
template <typename T, typename I>
T simd_shuffle(T x, I source_lane) {
  const int source = int(source_lane);
  return emu::collective(x, [source](auto lane, int width, int) {
    return lane(source < 0 ? 0 : source < width ? source : width - 1);
  });
}
template <typename T, typename I>
T simd_broadcast(T x, I source_lane) { return simd_shuffle(x, source_lane); }
template <typename T>
T simd_broadcast_first(T x) { return simd_shuffle(x, 0); }
// Lanes whose source falls outside the simdgroup keep their own value.
template <typename T, typename I>
T simd_shuffle_down(T x, I delta) {
  const int d = int(delta);
  return emu::collective(x, [d](auto lane, int width, int self) {
    return self + d < width ? lane(self + d) : lane(self);
  });
}
template <typename T, typename I>
T simd_shuffle_up(T x, I delta) {
  const int d = int(delta);
  return emu::collective(x, [d](auto lane, int, int self) {
    return self - d >= 0 ? lane(self - d) : lane(self);
  });
}
template <typename T, typename I>
T simd_shuffle_xor(T x, I mask) {
  const int m = int(mask);
  return emu::collective(x, [m](auto lane, int width, int self) {
    return (self ^ m) < width ? lane(self ^ m) : lane(self);
  });
}
inline bool simd_any(bool x) {
  return emu::collective(x, [](auto lane, int width, int) {
    for (int i = 0; i < width; i++)
      if (lane(i)) return true;
    return false;
  });
}
inline bool simd_all(bool x) {
  return emu::collective(x, [](auto lane, int width, int) {
    for (int i = 0; i < width; i++)
      if (!lane(i)) return false;
    return true;
  });
}

}  // namespace metal

// MLX's kernel prelude brings the metal namespace into scope; so does this one.
using namespace metal;

inline size_t ceildiv(size_t n, size_t m) { return (n + m - 1) / m; }

// ---- address spaces ---------------------------------------------------------------------
// Everything below this line sees Metal's qualifiers; nothing below may name std::thread.
#ifndef METAL_EMU_RUNTIME
#define device
#define constant
#define thread
#define threadgroup static
#endif
