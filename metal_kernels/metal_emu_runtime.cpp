// The threads behind metal_emu.h: threadgroups of real std::threads, threadgroup barriers and
// simdgroup exchanges. Compiled once (cached by content) and linked into every emulated kernel.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define METAL_EMU_RUNTIME
#include "metal_emu.h"

namespace emu {
namespace {

struct Abort {};  // thrown out of every wait once a launch has failed

struct LaunchState {
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
// threadgroups and edge simdgroups have fewer threads). A wait that outlives the launch
// timeout fails the launch; once failed, every wait throws Abort.
class Barrier {
 public:
  void reset(int count) {
    std::lock_guard<std::mutex> lock(mutex_);
    count_ = count;
    arrived_ = 0;
  }
  void wait(LaunchState& launch, const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (aborted_) throw Abort{};
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
  int width = kSimdWidth;
  alignas(16) unsigned char scratch[2][kSimdWidth][16];
};

struct ThreadState {
  LaunchState* launch;
  Barrier* threadgroup_barrier;
  Simdgroup* simdgroup;
  int lane;
  int scratch_phase;
  uint64_t rng;
};

thread_local ThreadState* current = nullptr;

void jitter() {
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

uint ceil_div(uint a, uint b) { return (a + b - 1) / b; }

}  // namespace

// Two scratch buffers alternate, so a lane cannot overwrite a value another lane still reads:
// it would first have to pass the next exchange's barrier, which that lane has not reached.
SimdLanes simd_exchange(const void* value, int size) {
  ThreadState& t = *current;
  jitter();
  Simdgroup& sg = *t.simdgroup;
  auto& buffer = sg.scratch[t.scratch_phase];
  t.scratch_phase ^= 1;
  std::memcpy(buffer[t.lane], value, size);
  sg.barrier.wait(*t.launch, "simdgroup collective");
  return SimdLanes{buffer, sg.width, t.lane};
}

void threadgroup_barrier() {
  jitter();
  current->threadgroup_barrier->wait(*current->launch, "threadgroup_barrier");
}

int launch(const uint32_t grid[3], const uint32_t group[3], uint32_t jitter_seed, double timeout_s,
           char* error, int error_len, KernelEntry entry, void* context) {
  const uint3 grid_dims{grid[0], grid[1], grid[2]};
  const uint3 group_dims{std::min(group[0], grid[0]), std::min(group[1], grid[1]),
                         std::min(group[2], grid[2])};
  const int workers = int(group_dims.x * group_dims.y * group_dims.z);
  if (workers <= 0 || workers > 1024) {
    std::snprintf(error, error_len, "threadgroup size must be 1..1024 threads, got %d", workers);
    return -1;
  }
  const uint3 groups{ceil_div(grid_dims.x, group_dims.x), ceil_div(grid_dims.y, group_dims.y),
                     ceil_div(grid_dims.z, group_dims.z)};
  const int max_simdgroups = (workers + kSimdWidth - 1) / kSimdWidth;

  LaunchState state;
  state.timeout = std::chrono::milliseconds(int64_t(timeout_s * 1000));
  state.jitter_seed = jitter_seed;
  Barrier launch_barrier, group_barrier;
  launch_barrier.reset(workers);
  std::vector<Simdgroup> simdgroups(max_simdgroups);
  uint3 group_id{0, 0, 0}, group_size{0, 0, 0};

  // Worker w is the thread at position w of every threadgroup, which run one after another.
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
              group_id = {gx, gy, gz};
              group_size = {std::min(group_dims.x, grid_dims.x - gx * group_dims.x),
                            std::min(group_dims.y, grid_dims.y - gy * group_dims.y),
                            std::min(group_dims.z, grid_dims.z - gz * group_dims.z)};
              const int active = int(group_size.x * group_size.y * group_size.z);
              group_barrier.reset(active);
              for (int s = 0; s < max_simdgroups; s++) {
                simdgroups[s].width = std::clamp(active - s * kSimdWidth, 0, kSimdWidth);
                simdgroups[s].barrier.reset(simdgroups[s].width);
              }
            }
            launch_barrier.wait(state, "threadgroup start");
            const uint3 size = group_size;
            if (local.x < size.x && local.y < size.y && local.z < size.z) {
              const uint index = local.x + local.y * size.x + local.z * size.x * size.y;
              const uint threads = size.x * size.y * size.z;
              Attrs a{};
              a.thread_position_in_threadgroup = local;
              a.threadgroup_position_in_grid = group_id;
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
              a.simdgroups_per_threadgroup = ceil_div(threads, kSimdWidth);
              a.dispatch_simdgroups_per_threadgroup = uint(max_simdgroups);
              a.threads_per_simdgroup = kSimdWidth;
              a.thread_execution_width = kSimdWidth;
              a.quadgroup_index_in_threadgroup = index / 4;
              a.thread_index_in_quadgroup = index % 4;
              a.quadgroups_per_threadgroup = ceil_div(threads, 4);
              a.dispatch_quadgroups_per_threadgroup = ceil_div(uint(workers), 4);
              ts.simdgroup = &simdgroups[index / kSimdWidth];
              ts.lane = int(index % kSimdWidth);
              ts.scratch_phase = 0;
              entry(a, context);
            }
            launch_barrier.wait(state, "threadgroup end");
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
    std::snprintf(error, error_len, "%s", state.error.c_str());
    return -1;
  }
  return 0;
}

}  // namespace emu
