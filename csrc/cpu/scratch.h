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

// Drops every thread's kept buffer (buffers in use by a running op stay alive until it
// returns); returns the bytes released.
inline int64_t empty_cache() {
  using namespace scratch_detail;
  std::lock_guard<std::mutex> lock(registry().mutex);
  int64_t released = 0;
  for (ThreadScratch* t : registry().threads) released += t->release_locked();
  return released;
}

// Bytes all threads keep now.
inline int64_t scratch_bytes() {
  using namespace scratch_detail;
  std::lock_guard<std::mutex> lock(registry().mutex);
  return registry().kept_bytes;
}

}  // namespace cpu
}  // namespace rnnext
