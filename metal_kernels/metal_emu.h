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

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

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

// ---- the runtime: barriers, simdgroups, launch ------------------------------------------
namespace emu {

constexpr int kSimdWidth = 32;

struct Abort {};  // thrown out of every wait once a launch has failed

struct Launch {
  std::mutex mutex;
  bool failed = false;
  std::string error;
  std::chrono::milliseconds timeout{10000};
  uint32_t jitter_seed = 0;

  void fail(const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!failed) error = why;
    failed = true;
  }
  bool has_failed() {
    std::lock_guard<std::mutex> lock(mutex);
    return failed;
  }
};

// A reusable barrier whose participant count is reset between threadgroups (edge
// threadgroups and edge simdgroups have fewer threads).
class Barrier {
 public:
  void reset(int count) {
    std::lock_guard<std::mutex> lock(mutex_);
    count_ = count;
    arrived_ = 0;
  }
  void wait(Launch& launch, const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      generation_++;
      cv_.notify_all();
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + launch.timeout;
    while (generation_ == generation) {
      if (aborted_) throw Abort{};
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout &&
          generation_ == generation) {
        aborted_ = true;
        cv_.notify_all();
        lock.unlock();
        launch.fail(std::string(what) +
                    " not reached by every thread in time (divergent control flow?)");
        throw Abort{};
      }
    }
  }
  void abort() {
    std::lock_guard<std::mutex> lock(mutex_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_ = 0, arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false;
};

struct Simdgroup {
  Barrier barrier;
  int width = kSimdWidth;  // active lanes
  alignas(16) unsigned char scratch[2][kSimdWidth][16];
};

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

struct ThreadState {
  Launch* launch;
  Barrier* threadgroup_barrier;
  Simdgroup* simdgroup;
  int lane;
  int scratch_phase;
  uint64_t rng;
};

inline thread_local ThreadState* current = nullptr;

inline void jitter() {
  ThreadState& t = *current;
  if (t.launch->jitter_seed == 0) return;
  t.rng ^= t.rng << 13;
  t.rng ^= t.rng >> 7;
  t.rng ^= t.rng << 17;
  if (t.rng % 8 == 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(t.rng % 200));
  } else {
    std::this_thread::yield();
  }
}

// One collective step of a simdgroup: every lane publishes `value`, waits for the others, then
// `combine(lanes, width, lane)` reads the published values. Two scratch buffers alternate, so
// a lane cannot overwrite a value another lane still reads: it would first have to pass the
// next step's barrier, which that lane has not reached yet.
template <typename V, typename F>
auto collective(const V& value, F combine) {
  static_assert(sizeof(V) <= 16, "simdgroup value too large");
  ThreadState& t = *current;
  jitter();
  Simdgroup& sg = *t.simdgroup;
  unsigned char(&buf)[kSimdWidth][16] = sg.scratch[t.scratch_phase];
  t.scratch_phase ^= 1;
  std::memcpy(buf[t.lane], &value, sizeof(V));
  sg.barrier.wait(*t.launch, "simdgroup collective");
  auto lane_value = [&](int i) {
    V v;
    std::memcpy(&v, buf[i], sizeof(V));
    return v;
  };
  return combine(lane_value, sg.width, t.lane);
}

inline void threadgroup_barrier() {
  jitter();
  current->threadgroup_barrier->wait(*current->launch, "threadgroup_barrier");
}

inline uint ceil_div(uint a, uint b) { return (a + b - 1) / b; }

// Runs `kernel(const Attrs&)` over the grid like dispatchThreads(grid, threadgroup).
// Returns 0, or -1 with `error` set.
template <typename F>
int launch(const uint32_t grid[3], const uint32_t group[3], uint32_t jitter_seed,
           double timeout_s, std::string& error, F kernel) {
  const uint3 grid_dims{grid[0], grid[1], grid[2]};
  const uint3 group_dims{std::min(group[0], grid[0]), std::min(group[1], grid[1]),
                         std::min(group[2], grid[2])};
  const uint3 groups{ceil_div(grid_dims.x, group_dims.x), ceil_div(grid_dims.y, group_dims.y),
                     ceil_div(grid_dims.z, group_dims.z)};
  const int workers = int(group_dims.x * group_dims.y * group_dims.z);
  if (workers <= 0 || workers > 1024) {
    error = "threadgroup size must be 1..1024 threads";
    return -1;
  }
  const int max_simdgroups = (workers + kSimdWidth - 1) / kSimdWidth;

  Launch state;
  state.timeout = std::chrono::milliseconds(int64_t(timeout_s * 1000));
  state.jitter_seed = jitter_seed;
  Barrier launch_barrier, group_barrier;
  launch_barrier.reset(workers);
  std::vector<Simdgroup> simdgroups(max_simdgroups);
  uint3 current_group{0, 0, 0};
  uint3 current_size{0, 0, 0};

  auto worker = [&](int w) {
    ThreadState ts{&state, &group_barrier, nullptr, 0, 0,
                   0x9E3779B97F4A7C15ull * uint64_t(w + 1) + jitter_seed};
    current = &ts;
    const uint3 local{uint(w) % group_dims.x, (uint(w) / group_dims.x) % group_dims.y,
                      uint(w) / (group_dims.x * group_dims.y)};
    try {
      for (uint gz = 0; gz < groups.z; gz++)
        for (uint gy = 0; gy < groups.y; gy++)
          for (uint gx = 0; gx < groups.x; gx++) {
            if (w == 0) {  // set up this threadgroup while the others wait
              current_group = {gx, gy, gz};
              current_size = {std::min(group_dims.x, grid_dims.x - gx * group_dims.x),
                              std::min(group_dims.y, grid_dims.y - gy * group_dims.y),
                              std::min(group_dims.z, grid_dims.z - gz * group_dims.z)};
              const int active = int(current_size.x * current_size.y * current_size.z);
              group_barrier.reset(active);
              for (int s = 0; s < max_simdgroups; s++) {
                simdgroups[s].width = std::clamp(active - s * kSimdWidth, 0, kSimdWidth);
                simdgroups[s].barrier.reset(simdgroups[s].width);
              }
            }
            launch_barrier.wait(state, "launch");
            const uint3 size = current_size;
            if (local.x < size.x && local.y < size.y && local.z < size.z) {
              Attrs a{};
              const uint index = local.x + local.y * size.x + local.z * size.x * size.y;
              a.thread_position_in_threadgroup = local;
              a.threadgroup_position_in_grid = current_group;
              a.thread_position_in_grid = {gx * group_dims.x + local.x,
                                           gy * group_dims.y + local.y,
                                           gz * group_dims.z + local.z};
              a.threads_per_threadgroup = size;
              a.dispatch_threads_per_threadgroup = group_dims;
              a.threadgroups_per_grid = groups;
              a.threads_per_grid = grid_dims;
              a.grid_size = grid_dims;
              a.grid_origin = {0, 0, 0};
              a.thread_index_in_threadgroup = index;
              a.simdgroup_index_in_threadgroup = index / kSimdWidth;
              a.thread_index_in_simdgroup = index % kSimdWidth;
              a.simdgroups_per_threadgroup = ceil_div(size.x * size.y * size.z, kSimdWidth);
              a.dispatch_simdgroups_per_threadgroup = uint(max_simdgroups);
              a.threads_per_simdgroup = kSimdWidth;
              a.thread_execution_width = kSimdWidth;
              a.quadgroup_index_in_threadgroup = index / 4;
              a.thread_index_in_quadgroup = index % 4;
              a.quadgroups_per_threadgroup = ceil_div(size.x * size.y * size.z, 4);
              a.dispatch_quadgroups_per_threadgroup = ceil_div(uint(workers), 4);
              ts.simdgroup = &simdgroups[index / kSimdWidth];
              ts.lane = int(index % kSimdWidth);
              ts.scratch_phase = 0;
              kernel(a);
            }
            launch_barrier.wait(state, "end of threadgroup");
          }
    } catch (const Abort&) {
    } catch (const std::exception& e) {
      state.fail(e.what());
    }
    if (state.has_failed()) {  // release everyone still waiting
      launch_barrier.abort();
      group_barrier.abort();
      for (auto& s : simdgroups) s.barrier.abort();
    }
    current = nullptr;
  };

  std::vector<std::thread> threads;
  threads.reserve(workers);
  for (int w = 0; w < workers; w++) threads.emplace_back(worker, w);
  for (auto& t : threads) t.join();
  if (state.failed) {
    error = state.error;
    return -1;
  }
  return 0;
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
template <typename T>
T simd_sum(T x) {
  return emu::collective(x, [](auto lane, int width, int) {
    T acc = lane(0);
    for (int i = 1; i < width; i++) acc = acc + lane(i);
    return acc;
  });
}
template <typename T>
T simd_max(T x) {
  return emu::collective(x, [](auto lane, int width, int) {
    T acc = lane(0);
    for (int i = 1; i < width; i++) acc = max(acc, lane(i));
    return acc;
  });
}
template <typename T>
T simd_min(T x) {
  return emu::collective(x, [](auto lane, int width, int) {
    T acc = lane(0);
    for (int i = 1; i < width; i++) acc = min(acc, lane(i));
    return acc;
  });
}
template <typename T>
T simd_prefix_exclusive_sum(T x) {
  return emu::collective(x, [](auto lane, int, int self) {
    T acc = T(0);
    for (int i = 0; i < self; i++) acc = acc + lane(i);
    return acc;
  });
}
template <typename T>
T simd_prefix_inclusive_sum(T x) {
  return emu::collective(x, [](auto lane, int, int self) {
    T acc = lane(0);
    for (int i = 1; i <= self; i++) acc = acc + lane(i);
    return acc;
  });
}
template <typename T, typename I>
T simd_shuffle(T x, I source_lane) {
  const int source = int(source_lane);
  return emu::collective(x, [source](auto lane, int width, int) {
    return lane(std::clamp(source, 0, width - 1));
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
#define device
#define constant
#define thread
#define threadgroup static
