// The CPU backend's tuning knobs, in one place. Each is read once from its environment
// variable when rnnext is imported (rnnext/_ops.py asks for them), validated there (a
// malformed value is a ValueError naming the variable), and can be changed later with
// rnnext._C.cpu_option(name, value) for comparisons and tests. None changes a result's
// correctness; the GEMM ones change which route computes a product.
//
//   name             variable                 values (default)
//   own_gemm         RNNEXT_OWN_GEMM          auto | avx512 | avx2 | blas (auto: the widest
//                                             kernel the CPU has; blas: none of ours)
//   mkl_packed       RNNEXT_MKL_PACKED        1 | 0 (1: MKL's packed GEMM for large chunks)
//   onednn           RNNEXT_ONEDNN            1 | 0 (1: oneDNN for the backward's grad_x and
//                                             weight gradients where it pays)
//   streaming_bytes  RNNEXT_STREAMING_BYTES   bytes >= 0 (16 MiB): per-step weights from this
//                                             size on are prefetched as streamed (AVX2 kernel)
//   chunk_rows       RNNEXT_CHUNK_ROWS        rows >= 1, or auto (auto: ~4 MiB of gi per chunk)
//   bf16_gemm        RNNEXT_BF16_GEMM         1 | 0 (1: a bfloat16 layer's input projection
//                                             on bfloat16 dot products, where the CPU has
//                                             AVX512-BF16; packed_gemm_bf16.h)
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "packed_gemm.h"

namespace rnnext {
namespace cpu {
namespace options {

constexpr int64_t kDefaultStreamingBytes = int64_t(16) << 20;
constexpr int64_t kAutoChunkRows = 0;

struct State {
  std::atomic<int> own_gemm;
  std::atomic<bool> mkl_packed, onednn, bf16_gemm;
  std::atomic<int64_t> streaming_bytes, chunk_rows;
};

inline bool parse_flag(const std::string& text, const char* what) {
  TORCH_CHECK_VALUE(text == "0" || text == "1", "rnnext: ", what, "='", text, "': expected 1 or 0");
  return text == "1";
}

inline int64_t parse_count(const std::string& text, const char* what, int64_t min, bool allow_auto) {
  if (allow_auto && text == "auto") return kAutoChunkRows;
  size_t used = 0;
  long long value = -1;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  TORCH_CHECK_VALUE(used == text.size() && !text.empty() && text[0] != '+' && text[0] != ' ' && value >= min,
                    "rnnext: ", what, "='", text, "': expected an integer >= ", min, allow_auto ? " or auto" : "");
  return value;
}

// The environment variable's value, or `fallback` where it is unset.
inline std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value ? std::string(value) : std::string(fallback);
}

inline State& state() {
  static State* s = [] {
    // Parse everything first: a malformed variable throws here, and the next call retries.
    const int own = static_cast<int>(packed_gemm::parse_kernel(env_or("RNNEXT_OWN_GEMM", "auto"), "RNNEXT_OWN_GEMM"));
    const bool mkl = parse_flag(env_or("RNNEXT_MKL_PACKED", "1"), "RNNEXT_MKL_PACKED");
    const bool onednn = parse_flag(env_or("RNNEXT_ONEDNN", "1"), "RNNEXT_ONEDNN");
    const int64_t streaming = parse_count(env_or("RNNEXT_STREAMING_BYTES", std::to_string(kDefaultStreamingBytes).c_str()),
                                          "RNNEXT_STREAMING_BYTES", 0, false);
    const int64_t chunk = parse_count(env_or("RNNEXT_CHUNK_ROWS", "auto"), "RNNEXT_CHUNK_ROWS", 1, true);
    const bool bf16 = parse_flag(env_or("RNNEXT_BF16_GEMM", "1"), "RNNEXT_BF16_GEMM");
    State* r = new State();
    r->own_gemm = own;
    r->mkl_packed = mkl;
    r->onednn = onednn;
    r->streaming_bytes = streaming;
    r->chunk_rows = chunk;
    r->bf16_gemm = bf16;
    return r;
  }();
  return *s;
}

inline packed_gemm::Kernel own_gemm() { return static_cast<packed_gemm::Kernel>(state().own_gemm.load()); }
inline bool mkl_packed() { return state().mkl_packed.load(); }
inline bool onednn() { return state().onednn.load(); }
inline int64_t streaming_bytes() { return state().streaming_bytes.load(); }
inline int64_t chunk_rows() { return state().chunk_rows.load(); }  // kAutoChunkRows: automatic
inline bool bf16_gemm() { return state().bf16_gemm.load(); }

// The option's value as text ("own_gemm" -> "avx512", "chunk_rows" -> "auto" or "50", ...).
inline std::string get(const std::string& name) {
  State& s = state();
  if (name == "own_gemm") return packed_gemm::kernel_name(own_gemm());
  if (name == "mkl_packed") return s.mkl_packed ? "1" : "0";
  if (name == "onednn") return s.onednn ? "1" : "0";
  if (name == "streaming_bytes") return std::to_string(s.streaming_bytes.load());
  if (name == "chunk_rows") return s.chunk_rows == kAutoChunkRows ? "auto" : std::to_string(s.chunk_rows.load());
  if (name == "bf16_gemm") return s.bf16_gemm ? "1" : "0";
  TORCH_CHECK_VALUE(false, "rnnext: no CPU option '", name,
                    "' (options: own_gemm, mkl_packed, onednn, streaming_bytes, chunk_rows, bf16_gemm)");
}

// Sets the option from text, validated as its variable is; later op calls see it.
inline void set(const std::string& name, const std::string& value) {
  State& s = state();
  get(name);  // an unknown name is an error before anything changes
  const std::string what = "cpu_option " + name;
  if (name == "own_gemm") s.own_gemm = static_cast<int>(packed_gemm::parse_kernel(value, what.c_str()));
  if (name == "mkl_packed") s.mkl_packed = parse_flag(value, what.c_str());
  if (name == "onednn") s.onednn = parse_flag(value, what.c_str());
  if (name == "streaming_bytes") s.streaming_bytes = parse_count(value, what.c_str(), 0, false);
  if (name == "chunk_rows") s.chunk_rows = parse_count(value, what.c_str(), 1, true);
  if (name == "bf16_gemm") s.bf16_gemm = parse_flag(value, what.c_str());
}

}  // namespace options
}  // namespace cpu
}  // namespace rnnext
