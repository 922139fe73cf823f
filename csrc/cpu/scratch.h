// Scratch memory reused across op calls on the same thread (the CPU forward's buffer for a
// chunk of the input projection).
//
// Why: a fresh multi-megabyte tensor in every call is a page fault per 4 KiB page it touches
// (glibc hands large freed blocks back to the kernel): at T=100, B=32, H=256 an LSTM forward
// took ~4,500 of them, ~15 % of its time.
//
// Bounds: each thread keeps at most one buffer of up to kMaxScratchBytes, and all threads
// together at most kMaxScratchTotalBytes (a buffer that would pass it is used once and freed),
// so a pool of many threads calling rnnext does not hold 32 MiB each. empty_cache() drops
// every thread's buffer (rnnext.empty_cache()); a thread's buffer also goes when it exits.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>

namespace rnnext {
namespace cpu {
namespace scratch_detail {

constexpr int64_t kMaxScratchBytes = int64_t(32) << 20;
constexpr int64_t kMaxScratchTotalBytes = int64_t(128) << 20;

struct ThreadScratch;

// Every live thread's scratch, and the bytes they keep; guarded by mutex().
struct Registry {
  std::mutex mutex;
  std::set<ThreadScratch*> threads;
  int64_t kept_bytes = 0;
};

inline Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: threads may exit after static teardown
  return *r;
}

struct ThreadScratch {
  at::Tensor kept;  // guarded by registry().mutex (empty_cache clears it from another thread)
  ThreadScratch() {
    std::lock_guard<std::mutex> lock(registry().mutex);
    registry().threads.insert(this);
  }
  ~ThreadScratch() {
    std::lock_guard<std::mutex> lock(registry().mutex);
    release_locked();
    registry().threads.erase(this);
  }
  int64_t release_locked() {
    const int64_t bytes = kept.defined() ? kept.nbytes() : 0;
    registry().kept_bytes -= bytes;
    kept = at::Tensor();
    return bytes;
  }
};

}  // namespace scratch_detail

// A [shape] tensor of `options` from this thread's scratch buffer (grown as needed, within
// the bounds above). It aliases the kept buffer: it must not outlive the op that asked for
// it, nor be handed to the caller.
inline at::Tensor scratch(at::IntArrayRef shape, const at::TensorOptions& options) {
  using namespace scratch_detail;
  thread_local ThreadScratch mine;
  const int64_t numel = c10::multiply_integers(shape);
  std::lock_guard<std::mutex> lock(registry().mutex);
  at::Tensor& kept = mine.kept;
  if (kept.defined() && kept.scalar_type() == options.dtype().toScalarType() && kept.numel() >= numel) {
    return kept.narrow(0, 0, numel).view(shape);
  }
  mine.release_locked();
  at::Tensor fresh = at::empty({numel}, options);
  const int64_t bytes = fresh.nbytes();
  if (bytes <= kMaxScratchBytes && registry().kept_bytes + bytes <= kMaxScratchTotalBytes) {
    kept = fresh;
    registry().kept_bytes += bytes;
  }
  return fresh.view(shape);
}

// Large blocks kept for reuse, process-wide: what a tensor from pooled_empty() held comes back
// here when the tensor dies, up to kMaxPooledBytes in all (past that it is freed).
//
// Why: the training workspace, the backward's gate gradients and the packed weights are
// MiB to tens of MiB, allocated and freed at every call; fresh, each 4 KiB page costs a page
// fault and the kernel's zeroing. At T=50, B=64, H=1024 the LSTM's 65 MiB workspace made its
// training forward ~35 ms slower than its inference (Zen 4, ~300 ms), ~10 ms with the pages
// reused; packing its 16 MiB W_hh took ~5 ms into fresh memory, ~1 ms into reused.
namespace pool_detail {

constexpr int64_t kMinPooledBytes = int64_t(4) << 20;
constexpr int64_t kMaxPooledBytes = int64_t(512) << 20;
constexpr size_t kAlignment = 64;

struct Pool {
  std::mutex mutex;
  std::multimap<int64_t, void*> free_blocks;  // capacity in bytes -> block
  int64_t kept_bytes = 0;
};

inline Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may die after static teardown
  return *p;
}

inline void give_back(void* block, int64_t capacity) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (p.kept_bytes + capacity <= kMaxPooledBytes) {
      p.free_blocks.emplace(capacity, block);
      p.kept_bytes += capacity;
      return;
    }
  }
  std::free(block);
}

// Frees every kept block; returns their bytes.
inline int64_t release() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  for (const auto& entry : p.free_blocks) std::free(entry.second);
  p.free_blocks.clear();
  const int64_t released = p.kept_bytes;
  p.kept_bytes = 0;
  return released;
}

}  // namespace pool_detail

// A new [shape] tensor of `options` (contiguous, uninitialised) whose memory, from 4 MiB on,
// comes from and goes back to the pool above: a kept block of at least its size and at most
// 5/4 of it, else a new one. Its storage cannot be resized: for the ops' workspaces and
// internal buffers, not for outputs a user may resize.
inline at::Tensor pooled_empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  using namespace pool_detail;
  const int64_t bytes = c10::multiply_integers(shape) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kMinPooledBytes || options.device().type() != at::kCPU) return at::empty(shape, options);
  void* block = nullptr;
  int64_t capacity = 0;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free_blocks.lower_bound(bytes);
    if (it != p.free_blocks.end() && it->first <= bytes + bytes / 4) {
      capacity = it->first;
      block = it->second;
      p.kept_bytes -= capacity;
      p.free_blocks.erase(it);
    }
  }
  if (block == nullptr) {
    capacity = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    block = std::aligned_alloc(kAlignment, static_cast<size_t>(capacity));
    TORCH_CHECK(block != nullptr, "rnnext: out of memory allocating ", capacity, " bytes");
  }
  return at::from_blob(block, shape, [capacity](void* data) { pool_detail::give_back(data, capacity); },
                       options.memory_format(std::nullopt));
}

// Drops every thread's kept buffer and the pool's blocks (buffers in use by a running op, and
// tensors alive, stay until they die); returns the bytes released.
inline int64_t empty_cache() {
  using namespace scratch_detail;
  int64_t released = pool_detail::release();
  std::lock_guard<std::mutex> lock(registry().mutex);
  for (ThreadScratch* t : registry().threads) released += t->release_locked();
  return released;
}

// Bytes kept now: all threads' scratch buffers and the pool's free blocks.
inline int64_t scratch_bytes() {
  using namespace scratch_detail;
  int64_t kept = 0;
  {
    std::lock_guard<std::mutex> lock(pool_detail::pool().mutex);
    kept += pool_detail::pool().kept_bytes;
  }
  std::lock_guard<std::mutex> lock(registry().mutex);
  return kept + registry().kept_bytes;
}

}  // namespace cpu
}  // namespace rnnext
