// The CPU time loop of one layer in one direction, written once for every cell type.
//
// A cell type plugs in through a small policy struct (see rnn.cpp, gru.cpp, lstm.cpp) that
// says how many gates it has, whether it carries a cell state c, where b_hh goes, and gives
// the fused pointwise pass over a block of batch rows, forward and backward. Everything else
// — argument checks, the packed/padded step layout, the GEMMs, the workspace, the order of
// the steps — lives here.
//
// The sequence layout and the argument checks are shared with CUDA (../layer_checks.h), and
// so is the workspace layout (../workspace.h). A state buffer [B, Hout] holds each row's
// latest h; rows past their end are simply not touched, so their state stays final (forward
// direction) or still the initial one (reverse direction).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include <optional>
#include <tuple>
#include <vector>

#include "../layer_ops.h"
#include "gemm.h"
#include "options.h"
#include "packed_gemm_bf16.h"
#include "scratch.h"

namespace rnnext {
namespace cpu {


// Pointers of one step for one block of hidden units [j0, j0 + n), handed to the cell's
// pointwise pass (rows are this step's batch rows). Every pointer is already offset to unit
// j0: gate g of unit j0 + j is gi[g * gi_gs + j] and gh[g * gh_gs + j]; workspace block k is
// ws[k * H + j].
template <typename T>
struct ForwardStep {
  int64_t H, n;                 // the layer's hidden size (gate stride of ws, c's row), units here
  const T* gi; int64_t gi_ld; int64_t gi_gs;  // [rows, G*n] input projection (+ biases folded in)
  const T* gh; int64_t gh_ld; int64_t gh_gs;  // [rows, G*n] h_prev @ W_hh^T (+ b_hh, GRU)
  const T* h_prev; int64_t h_prev_ld;         // [rows, Hout]
  T* ws; int64_t ws_ld;         // [rows, ws_cols]; nullptr when no backward will follow
  T* c_state;                   // [rows, H] LSTM cell state, read as c_prev, written as c
  T* h_out; int64_t h_out_ld;   // [rows, H] new h (LSTM with projection: r, before W_hr)

  // The same step for row b alone (its row 0), its workspace row at ws_row.
  ForwardStep row(int64_t b, T* ws_row) const {
    ForwardStep r = *this;
    r.gi += b * gi_ld;
    r.gh += b * gh_ld;
    r.h_prev += b * h_prev_ld;
    r.ws = ws_row;
    if (c_state) r.c_state += b * H;
    r.h_out += b * h_out_ld;
    return r;
  }
};

// dst[0, n) = src[0, n) with non-temporal stores (x86: SSE2's 16-byte streaming store, the
// unaligned head and tail plainly): the values go to memory without first reading the lines
// they fill, and without evicting what the cache holds. The caller orders them (sfence())
// before anything reads them.
template <typename T>
inline void stream_values(T* dst, const T* src, int64_t n) {
#if defined(__SSE2__)
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const int64_t head = std::min<int64_t>(bytes, (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 16; bytes -= 16, d += 16, s += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
  if (bytes > 0) std::memcpy(d, s, bytes);
#else
  copy_values(dst, src, n);
#endif
}

inline void sfence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename T>
struct BackwardStep {
  int64_t H, Hout;
  const T* dh; int64_t dh_ld;   // [rows, H] gradient of the cell's h (or r with projection)
  T* dc_state;                  // [rows, H] LSTM: in dc of c_t, out dc of c_prev
  const T* ws; int64_t ws_ld;   // [rows, ws_cols]
  // The previous step's workspace rows (ld ws_ld), for rows b < carried, which it also
  // processed; rows from carried on begin at this step and start from c0 [B, H] (LSTM).
  const T* ws_prev; int64_t carried;
  const T* c0;
  const T* h_prev;              // [rows, Hout] (leading dimension Hout)
  const T* y; int64_t y_ld;     // [rows, Hout] this step's output h_t
  T* d_gi; int64_t d_gi_ld;     // [rows, G*H] gradient of the input-side pre-activations
  T* d_gh; int64_t d_gh_ld;     // [rows, G*H] hidden side, GRU only (differs in n)
  T* dh_prev; int64_t dh_prev_ld;  // [rows, Hout] GRU writes its direct z * dh term here
};

// Rows per parallel task: enough gate elements per task (~8K, some microseconds of work)
// that waking a second thread pays for itself.
inline int64_t row_grain(int64_t elements_per_row) {
  return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, elements_per_row));
}

// The forward step loop splits the hidden units into one block per thread. Each thread owns
// its block for the whole sequence: it multiplies h_prev by its slice of W_hh (all G gates of
// its units) and runs the pointwise pass on that result straight away, while it is still in
// its own cache. So each thread keeps one slice of the weight warm across steps, the gate
// pre-activations never cross cores, and a step costs one fork/join. A block's product must
// be worth waking a thread for (kMinBlockWork multiply-adds); boundaries fall on multiples of
// 16 units so the pointwise loops stay at SIMD width.
//
// Once a thread's share of W_hh is larger than its L2 (kPrivateCacheBytes), the weight
// streams from L3 every step whoever owns it, so ownership buys nothing, while a fixed split
// leaves every thread waiting for the slowest core each step (measured at B=64, H=1024: the
// two threads' products took 4.1 and 4.5 ms). Such layers are cut into kBlocksPerThread
// blocks per thread, which the threads take in turn as they finish (see take_blocks).
constexpr int64_t kMinBlockWork = int64_t(1) << 18;
constexpr int64_t kPrivateCacheBytes = int64_t(768) << 10;
constexpr int64_t kBlocksPerThread = 8;

struct UnitBlock {
  int64_t j0, n;
};

inline std::vector<UnitBlock> unit_blocks(int64_t H, int64_t work_per_step, int64_t weight_bytes) {
  const int64_t threads = at::get_num_threads();
  int64_t count = std::min<int64_t>(threads, work_per_step / kMinBlockWork);
  if (count == threads && weight_bytes / threads > kPrivateCacheBytes) count = threads * kBlocksPerThread;
  count = std::max<int64_t>(1, std::min<int64_t>(count, H / 16));
  std::vector<UnitBlock> blocks;
  int64_t j0 = 0;
  for (int64_t k = 1; k <= count; ++k) {
    const int64_t j1 = k == count ? H : (H * k / count) / 16 * 16;
    if (j1 > j0) blocks.push_back({j0, j1 - j0});
    j0 = std::max(j0, j1);
  }
  return blocks;
}

// Runs run_block(k) for every block k once, on all threads: one block per thread when there
// are as many blocks as threads (each thread keeps its slice of W_hh from step to step),
// else each thread takes the next block not yet taken until none is left.
template <class F>
void take_blocks(int64_t n_blocks, const F& run_block) {
  if (n_blocks == 1) {
    run_block(0);
  } else if (n_blocks <= at::get_num_threads()) {
    // One block per task: the GEMM called inside runs on this thread alone.
    at::parallel_for(0, n_blocks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) run_block(k);
    });
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (int64_t k = next.fetch_add(1); k < n_blocks; k = next.fetch_add(1)) run_block(k);
    });
  }
}

// Asks the cache for units [0, n) of each of G gates of one row of gi (gate stride H).
template <typename T>
inline void prefetch_gates(const T* gi, int64_t G, int64_t H, int64_t n) {
  for (int64_t g = 0; g < G; ++g) {
    const char* p = reinterpret_cast<const char*>(gi + g * H);
    for (int64_t byte = 0; byte < n * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(p + byte, 0, 3);
  }
}

// Where the input projection gi = x @ W_ih^T (+ biases) is computed. With enough rows per
// step, and the step loop split across threads, each unit block computes its own slice of
// gi for the step, next to its slice of gh, into a buffer that stays in its cache: no pass
// over a [rows, G*H] buffer for the whole sequence, and the input product is split across
// threads like the recurrent one. Measured (T=100, B=32, H=256 LSTM, 2 threads): 5-10 %
// faster than projecting a chunk of steps at a time; at B <= 16 the per-step product is too
// small to run at full speed and the chunks (below) win. With the AVX-512 kernel it is not
// fused either once W_ih and W_hh together reach kFuseInputMaxWeightBytes (half the 32 MiB
// L3 of the machines we bench): read every step they stream from memory, and that kernel
// does not prefetch a streamed weight (see packed_gemm.h, group_rows_512), while per chunk
// W_ih is read once for several steps. Measured on Zen 4, T=50 B=64 H=1024 forward, 8 and
// 3 pairs of processes in turn: LSTM (32 MiB fused) ratio to torch.nn 0.99 -> 1.02 on
// average, GRU (24 MiB) 5 % faster; the RNN (8 MiB) stays fused, 2-4 % faster so. The AVX2
// kernel, which prefetches streamed weights, measured 3-8 % slower per chunk on the same
// machine capped to AVX2, so it keeps the fused product.
constexpr int64_t kFuseInputMinRows = 32;
constexpr int64_t kFuseInputMaxWeightBytes = int64_t(16) << 20;

inline bool fuse_input_product(int64_t B, int64_t n_blocks, int64_t weight_bytes, bool avx512_kernel) {
  return B >= kFuseInputMinRows && n_blocks > 1 && !(avx512_kernel && weight_bytes >= kFuseInputMaxWeightBytes);
}

// Whether the first step's gh = h0 @ W_hh^T runs beside the input projection, one product
// per thread, rather than after it with each product split across the threads: with one
// unit block (a *Cell call, a layer given one or two steps) the two do not depend on each
// other, and a product of these sizes gains less from a second thread than it costs to
// split. Each must be worth a thread (kMinThreadedWork multiply-adds, gemm.h). Measured on
// Zen 4 (two threads, calls alternated in one process, forward): LSTMCell, GRUCell, RNNCell
// at B=32, H=256 1.19x, 1.28x, 1.25x faster in float32 and 1.21x, 1.17x, 1.03x in float64;
// LSTM B=1 H=256 one step 1.25x, GRU 1.08x; training calls 0.97-1.16x, within those runs'
// noise. Only with two threads, where it was measured: with more, one product per thread
// would leave the others idle, so each product keeps its split across all of them.
inline bool overlap_first_step(int64_t n_blocks, bool fuse_input, int64_t gh_work, int64_t gi_work) {
  return n_blocks == 1 && !fuse_input && at::get_num_threads() == 2 && !at::in_parallel_region() &&
         std::min(gh_work, gi_work) >= kMinThreadedWork;
}

// Weights read per forward step from options::streaming_bytes() on (RNNEXT_STREAMING_BYTES,
// default 16 MiB) are taken to stream from memory (half the 32 MiB L3 of the machine we
// bench; the rest of a step's data shares it):
// StepWeight::set_streaming (the AVX2 kernel's prefetch; the AVX-512 one measured better
// without). Measured on Zen 3: LSTM and GRU at H=1024 (32 and 24 MiB per step) gain 4-12 %;
// RNN at H=1024 and LSTM at H=512 (8 MiB) do not. The backward's W_hh^T product
// measured no gain either, so it keeps the default.

// A run of consecutive steps [t0, t1) and the rows they own, [row0, row0 + rows).
struct StepChunk {
  int64_t t0, t1, row0, rows;
};

// Otherwise the forward computes the input projection one chunk of steps at a time,
// just before the steps that read it: a chunk of ~kChunkBytes of gi is still in cache when
// its steps run, it is big enough (>= kMinChunkRows rows) for the GEMM to run at full speed,
// and the buffer is the same from chunk to chunk and call to call (scratch). Chunks are
// listed in the order the direction processes them. options::chunk_rows() (RNNEXT_CHUNK_ROWS)
// sets the rows per chunk instead (the tests use it to put chunk edges at small sizes).
constexpr int64_t kChunkBytes = int64_t(4) << 20;
// Training workspaces of at least this size are written with non-temporal stores (see
// stream_values): they cannot stay in the cache until the backward reads them anyway.
constexpr int64_t kStreamWorkspaceBytes = int64_t(32) << 20;
constexpr int64_t kMinChunkRows = 512;

inline std::vector<StepChunk> step_chunks(const Steps& st, int64_t row_bytes, bool reverse) {
  int64_t target = std::max<int64_t>(kMinChunkRows, kChunkBytes / std::max<int64_t>(1, row_bytes));
  if (options::chunk_rows() != options::kAutoChunkRows) target = options::chunk_rows();
  std::vector<StepChunk> chunks;
  int64_t t0 = 0;
  while (t0 < st.T) {
    int64_t t1 = t0 + 1, rows = st.rows[t0];
    while (t1 < st.T && rows + st.rows[t1] <= target) rows += st.rows[t1++];
    chunks.push_back({t0, t1, st.offset[t0], rows});
    t0 = t1;
  }
  if (reverse) std::reverse(chunks.begin(), chunks.end());
  return chunks;
}

// h_prev of every row [N, Hout]: a row's previous output where its sequence had a previous
// step, else its initial state. Forward, step t-1 holds every row of step t (rows only end);
// in reverse, rows past batch_sizes[t+1] begin at step t and take h0.
template <typename T>
void gather_h_prev(const Steps& st, bool reverse, const T* y, const T* h0, int64_t Hout, T* h_prev) {
  for (int64_t t = 0; t < st.T; ++t) {
    const int64_t rows = st.rows[t], off = st.offset[t];
    const int64_t prev = previous_step(st, t, reverse);
    const int64_t carried = carried_rows(st, t, reverse);
    if (carried > 0) copy_values(h_prev + off * Hout, y + st.offset[prev] * Hout, carried * Hout);
    if (rows > carried) {
      copy_values(h_prev + (off + carried) * Hout, h0 + carried * Hout, (rows - carried) * Hout);
    }
  }
}

// A bfloat16 layer's x [N, I] and W_ih [G*H, I] as given (contiguous), beside their float32
// widening: its input projection multiplies them on bfloat16 dot products (Bf16StepWeight).
struct Bf16Inputs {
  Tensor x, w_ih;
};

// Forward over the whole sequence. Returns y ([T, B, Hout] or [N, Hout]), h_n [B, Hout],
// c_n [B, H] (undefined for cells without c) and the workspace [N, ws_cols] — [0, ws_cols]
// when need_backward is false: inference writes only what the next step reads.
//
// Per step, each unit block (see unit_blocks): gh = h_prev @ W_hh[block]^T,
// then the pointwise pass over the block (write h, and in training save the cell's gates and
// state); then with a projection y = r @ W_hr^T. h_prev is read straight from the previous
// step's output rows (or the initial state), so no state is copied per step; h_n is gathered
// from y at the end. The step loop touches raw pointers only: no tensor is made per step.
template <class Cell>
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(const Tensor& x_in, const Tensor& h0, const OptTensor& c0,
                                                         const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                         const OptTensor& b_hh, const OptTensor& w_hr,
                                                         const OptTensor& batch_sizes, bool reverse,
                                                         bool need_backward,
                                                         const std::optional<Bf16Inputs>& bf16 = std::nullopt) {
  const LayerSizes sz =
      check_forward_args<Cell>(kCpuBackend, x_in, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  const Steps& st = sz.steps;
  const int64_t B = st.B, H = sz.H, Hout = sz.Hout, G = sz.G, GH = sz.G * sz.H;
  const int64_t ws_cols = sz.ws_cols;
  const int64_t r_col = workspace::proj_col(Cell::kBlocks, H);  // LSTM proj only

  const Tensor x = x_in.dim() == 2 ? x_in.contiguous() : x_in.contiguous().view({st.N, sz.I});
  const Tensor w_hh_c = w_hh.contiguous();
  // A sequence too short to pack its weights (StepWeight::kMinUsesToPack) runs as one block:
  // a split would copy each block's gate rows of W_hh, and its products go to the BLAS, which
  // splits them across threads itself.
  const bool short_sequence = st.T < StepWeight<float>::kMinUsesToPack;
  const std::vector<UnitBlock> blocks =
      short_sequence ? std::vector<UnitBlock>{{0, H}} : unit_blocks(H, B * GH * Hout, GH * Hout * x.element_size());
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  // b_hh goes into gh for the cells that add it inside the recurrence (GRU), and for a short
  // sequence of any cell (a *Cell step, where folding it into gi's bias is one more ATen op
  // per call, b_ih + b_hh: ~0.2 us of a ~10 us RNNCell op at H=64); otherwise into gi's
  // bias, once for all steps.
  const bool gh_bias = b_hh.has_value() && (Cell::kRecurrentBias || short_sequence);
  // gi = x @ W_ih^T + b_ih (+ b_hh when the cell adds it outside the recurrence): per step
  // and unit block into a [B, G*H] buffer laid out like gh (fuse_input_product), or per
  // chunk of steps into one reused buffer (step_chunks; fused, the whole sequence is one
  // chunk with no projection of its own).
  OptTensor gi_bias;
  if (b_ih.has_value()) gi_bias = (gh_bias ? *b_ih : (*b_ih + *b_hh)).contiguous();
  const bool fuse_input =
      fuse_input_product(B, n_blocks, (w_ih.numel() + w_hh_c.numel()) * x.element_size(),
                         x.scalar_type() == at::kFloat && options::own_gemm() == packed_gemm::Kernel::kAvx512);
  const std::vector<StepChunk> chunks =
      fuse_input ? std::vector<StepChunk>{{0, st.T, 0, st.N}} : step_chunks(st, GH * x.element_size(), reverse);
  int64_t chunk_cap = 0;
  for (const StepChunk& ch : chunks) chunk_cap = std::max(chunk_cap, ch.rows);
  Tensor gi = fuse_input ? x.new_empty({B, GH}) : scratch({chunk_cap, GH}, x.options());

  Tensor y = x.new_empty({st.N, Hout});
  Tensor ws = pooled_empty({need_backward ? st.N : 0, ws_cols}, x.options());
  Tensor r_buf = (sz.proj && !need_backward) ? x.new_empty({B, H}) : Tensor();  // o * tanh(c)
  // h_state: the final state out. Only a packed sequence in reverse, whose later steps add
  // rows that begin from h0, also starts from it (a clone costs twice an empty tensor).
  const bool rows_join = batch_sizes.has_value() && reverse && st.T > 1;
  const Tensor h0_c = h0.contiguous();
  Tensor h_state = rows_join ? h0_c.clone() : at::empty({B, Hout}, h0_c.options());
  Tensor c_state = Cell::kHasCellState ? c0->contiguous().clone() : Tensor();
  Tensor gh = x.new_empty({B, GH});  // block k's [rows, G*n] at offset B * G * j0

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnext_layer_forward", [&] {
    scalar_t* h_ptr = h_state.data_ptr<scalar_t>();
    const scalar_t* h0_ptr = h0_c.data_ptr<scalar_t>();
    scalar_t* ws_ptr = ws.data_ptr<scalar_t>();
    scalar_t* y_ptr = y.data_ptr<scalar_t>();
    scalar_t* gh_ptr = gh.data_ptr<scalar_t>();
    scalar_t* c_ptr = Cell::kHasCellState ? c_state.data_ptr<scalar_t>() : nullptr;
    scalar_t* gi_ptr = gi.data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    // A bfloat16 layer's input projection on bfloat16 dot products (packed_gemm_bf16.h), from
    // its own bfloat16 x and W_ih (x and w_ih here are their float32 widening).
    const bool bf16_projection = std::is_same_v<scalar_t, float> && bf16.has_value() &&
                                 Bf16StepWeight::takes(st.T, StepWeight<float>::kMinUsesToPack);
    const at::BFloat16* x_bf16_ptr = bf16_projection ? bf16->x.data_ptr<at::BFloat16>() : nullptr;
    const std::optional<StepWeight<scalar_t>> w_ih_step =
        fuse_input || bf16_projection ? std::nullopt
                                      : std::make_optional<StepWeight<scalar_t>>(w_ih, chunk_cap, st.T);
    const std::optional<Bf16StepWeight> w_ih_bf16_step =
        !fuse_input && bf16_projection ? std::make_optional<Bf16StepWeight>(bf16->w_ih) : std::nullopt;
    const int64_t h_out_ld = sz.proj ? (need_backward ? ws_cols : H) : Hout;
    // y = r @ W_hr^T with a projection.
    const std::optional<StepWeight<scalar_t>> w_hr_step =
        sz.proj ? std::make_optional<StepWeight<scalar_t>>(*w_hr, B, st.T) : std::nullopt;
    // Each unit block's slice of W_hh [G*n, Hout] and of b_hh [G*n]; fused, also of W_ih
    // [G*n, I] and of gi's bias [G*n].
    std::vector<StepWeight<scalar_t>> w_block, w_ih_block;
    std::vector<Bf16StepWeight> w_ih_bf16_block;
    std::vector<Tensor> b_block, b_ih_block;
    const int64_t step_weight_bytes = (w_hh_c.numel() + (fuse_input ? w_ih.numel() : 0)) * x.element_size();
    const bool streaming = step_weight_bytes >= options::streaming_bytes();
    const bool stream_workspace = need_backward && Cell::kBlocks > 0 && ws.nbytes() >= kStreamWorkspaceBytes;
    for (const UnitBlock& ub : blocks) {
      w_block.push_back(StepWeight<scalar_t>::of_row_groups(w_hh_c, G, H, ub.j0, ub.n, B, st.T));
      w_block.back().set_streaming(streaming);
      b_block.push_back(gh_bias ? row_groups(*b_hh, G, H, ub.j0, ub.n).contiguous() : Tensor());
      if (fuse_input && bf16_projection) {
        w_ih_bf16_block.emplace_back(bf16->w_ih, G, H, ub.j0, ub.n);
      } else if (fuse_input) {
        w_ih_block.push_back(StepWeight<scalar_t>::of_row_groups(w_ih, G, H, ub.j0, ub.n, B, st.T));
        w_ih_block.back().set_streaming(streaming);
      }
      if (fuse_input) {
        b_ih_block.push_back(gi_bias.has_value() ? row_groups(*gi_bias, G, H, ub.j0, ub.n).contiguous() : Tensor());
      }
    }
    auto data_or_null = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    // C [rows, ldc] = x rows [row0, row0 + rows) @ W_ih^T (+ bias): the whole W_ih (k < 0), or
    // unit block k's rows of it (fused).
    auto input_product_rows = [&](int64_t k, int64_t rows, int64_t row0, const scalar_t* bias, scalar_t* c,
                                  int64_t ldc) {
      if (bf16_projection) {  // (float only: the widened bfloat16 layer)
        const Bf16StepWeight& w = k < 0 ? *w_ih_bf16_step : w_ih_bf16_block[k];
        w.multiply_bias(rows, x_bf16_ptr + row0 * sz.I, sz.I, reinterpret_cast<const float*>(bias),
                        reinterpret_cast<float*>(c), ldc);
        return;
      }
      const StepWeight<scalar_t>& w = k < 0 ? *w_ih_step : w_ih_block[k];
      w.multiply_bias(rows, x_ptr + row0 * sz.I, sz.I, bias, c, ldc);
    };
    const scalar_t* gi_bias_ptr = gi_bias.has_value() ? gi_bias->data_ptr<scalar_t>() : nullptr;
    // (The first step processed is st.T - 1 in reverse; its chunk is chunks.front().)
    const bool overlap_first =
        !chunks.empty() && overlap_first_step(n_blocks, fuse_input, st.rows[reverse ? st.T - 1 : 0] * GH * Hout,
                                              chunks.front().rows * GH * sz.I);
    // gh of unit block k for one step = h_prev @ W_hh[block]^T (+ b_hh[block]):
    // [rows, Hout] x [Hout, G*n], at block k's offset B * G * j0 of gh.
    auto recurrent_product = [&](int64_t k, int64_t rows, const scalar_t* h_prev) {
      const UnitBlock& ub = blocks[k];
      w_block[k].multiply_bias(rows, h_prev, Hout, data_or_null(b_block[k]), gh_ptr + B * G * ub.j0, G * ub.n);
    };
    for (const StepChunk& ch : chunks) {
      // gi[chunk] = x[chunk] @ W_ih^T (+ bias): [rows, I] x [I, G*H]
      auto project = [&] {
        input_product_rows(-1, ch.rows, ch.row0, gi_bias_ptr, gi_ptr, GH);
      };
      const bool first_gh_done = overlap_first && &ch == &chunks.front();
      if (first_gh_done) {
        // gi of the chunk beside the first step's gh, whose h_prev is the initial state
        // (h_state where rows join): one product per thread.
        const int64_t t = reverse ? ch.t1 - 1 : ch.t0;
        at::parallel_for(0, 2, 1, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            if (i == 0) {
              project();
            } else {
              recurrent_product(0, st.rows[t], rows_join ? h_ptr : h0_ptr);
            }
          }
        });
      } else if (!fuse_input) {
        project();
      }
      for (int64_t s = 0; s < ch.t1 - ch.t0; ++s) {
        const int64_t t = reverse ? ch.t1 - 1 - s : ch.t0 + s;
        const int64_t rows = st.rows[t], off = st.offset[t];
        // h_prev [rows, Hout]: the previous step's output rows, or the initial state. Only a
        // packed sequence in reverse grows: rows past the previous step's begin here from h0,
        // which h_state still holds.
        const int64_t prev = previous_step(st, t, reverse);
        const scalar_t* h_prev = rows_join ? h_ptr : h0_ptr;
        if (prev >= 0) {
          const scalar_t* y_prev = y_ptr + st.offset[prev] * Hout;
          if (st.rows[prev] >= rows) {
            h_prev = y_prev;
          } else {
            copy_values(h_ptr, y_prev, st.rows[prev] * Hout);
          }
        }
        scalar_t* h_out = !sz.proj ? y_ptr + off * Hout
                          : need_backward ? ws_ptr + off * ws_cols + r_col
                                          : r_buf.data_ptr<scalar_t>();
        auto run_block = [&](int64_t k) {
          const UnitBlock& ub = blocks[k];
          const int64_t gn = G * ub.n;
          scalar_t* gh_k = gh_ptr + B * G * ub.j0;
          if (!(first_gh_done && s == 0)) recurrent_product(k, rows, h_prev);
          ForwardStep<scalar_t> step;
          step.H = H;
          step.n = ub.n;
          if (fuse_input) {
            // gi = x_t @ W_ih[block]^T (+ bias[block]): [rows, I] x [I, G*n]
            scalar_t* gi_k = gi_ptr + B * G * ub.j0;
            input_product_rows(k, rows, off, data_or_null(b_ih_block[k]), gi_k, gn);
            step.gi = gi_k;
            step.gi_ld = gn;
            step.gi_gs = ub.n;
          } else {
            step.gi = gi_ptr + (off - ch.row0) * GH + ub.j0;
            step.gi_ld = GH;
            step.gi_gs = H;
          }
          step.gh = gh_k;
          step.gh_ld = gn;
          step.gh_gs = ub.n;
          step.h_prev = h_prev + ub.j0;
          step.h_prev_ld = Hout;
          step.ws = need_backward ? ws_ptr + off * ws_cols + ub.j0 : nullptr;
          step.ws_ld = ws_cols;
          step.c_state = c_ptr ? c_ptr + ub.j0 : nullptr;
          step.h_out = h_out + ub.j0;
          step.h_out_ld = h_out_ld;
          // Row by row; from a chunk's gi buffer (a strided read that may have left the
          // cache), fetching the next row's gates while this row's gate math runs. With one
          // block for the whole step (its products went to the BLAS on every thread) the rows
          // are split across threads: float64's gate math (libm's exp and tanh) at B = 32,
          // H = 256 otherwise took longer on one thread than the products did on two.
          // A workspace larger than the cache (stream_workspace) is written through a row of
          // staging in cache, then to memory by non-temporal stores: plain stores first read
          // each line they fill and push the step's weights out of the cache.
          auto run_rows = [&](int64_t b0, int64_t b1) {
            std::vector<scalar_t> staging(stream_workspace ? ws_cols : 0);
            for (int64_t b = b0; b < b1; ++b) {
              if (b + 1 < b1 && !fuse_input) prefetch_gates(step.gi + (b + 1) * GH, G, H, ub.n);
              if (!stream_workspace) {
                Cell::template forward_rows<scalar_t>(step, b, b + 1);
                continue;
              }
              Cell::template forward_rows<scalar_t>(step.row(b, staging.data() + ub.j0), 0, 1);
              scalar_t* ws_row = step.ws + b * ws_cols;
              for (int64_t block = 0; block < Cell::kBlocks; ++block) {
                stream_values(ws_row + block * H, staging.data() + ub.j0 + block * H, ub.n);
              }
            }
            if (stream_workspace) sfence();
          };
          if (n_blocks == 1) {
            at::parallel_for(0, rows, row_grain(G * ub.n), run_rows);
          } else {
            run_rows(0, rows);
          }
        };
        take_blocks(n_blocks, run_block);
        if (sz.proj) {
          // h = r @ W_hr^T: [rows, H] x [H, Hout]
          w_hr_step->multiply(rows, h_out, h_out_ld, false, y_ptr + off * Hout, Hout);
        }
      }
    }
    // h_n: each row's output at the last step that processed it. Forward, rows end as
    // batch_sizes falls; in reverse every row ends at step 0, which holds all B rows.
    for (int64_t t = 0; t < st.T; ++t) {
      const int64_t later = reverse ? (t == 0 ? 0 : st.rows[t]) : (t + 1 < st.T ? st.rows[t + 1] : 0);
      if (st.rows[t] > later) {
        copy_values(h_ptr + later * Hout, y_ptr + (st.offset[t] + later) * Hout, (st.rows[t] - later) * Hout);
      }
    }
  });

  if (x_in.dim() == 3) y = y.view({st.T, B, Hout});
  return {y, h_state, c_state, ws};
}

// weight_grads (../layer_ops.h) for a backward of a few rows in all (a *Cell call, one step
// of a layer; unpacked_tn_route): each d^T @ input by small_gemm_tn, the bias gradients as
// column sums in row order, straight into their tensors. Through ATen, each at::mm and
// at::sum cost ~2 us here, more than the arithmetic of a [256, 64] gradient. x is [N, I]
// contiguous; d_gi, d_gh, h_prev and dh have contiguous rows, r the workspace's (ws_cols).
template <typename T>
std::vector<Tensor> few_rows_weight_grads(const Tensor& d_gi, const Tensor& d_gh, const T* x, int64_t I,
                                          const Tensor& h_prev, bool has_bias, const OptTensor& dh,
                                          const OptTensor& r) {
  const int64_t N = d_gi.size(0);
  const at::TensorOptions options = d_gi.options();
  // d^T @ in: [cols of d, in_cols], summed over the N rows
  auto d_t_times = [&](const Tensor& d, const T* in, int64_t in_cols, int64_t in_ld) {
    Tensor g = at::empty({d.size(1), in_cols}, options);
    small_gemm_tn<T>(d.size(1), in_cols, N, d.data_ptr<T>(), d.stride(0), in, in_ld, false, g.data_ptr<T>(),
                     in_cols);
    return g;
  };
  auto column_sums = [&](const Tensor& d) {
    const int64_t cols = d.size(1), ld = d.stride(0);
    Tensor sums = at::empty({cols}, options);
    T* out = sums.data_ptr<T>();
    const T* rows = d.data_ptr<T>();
    std::fill(out, out + cols, T(0));
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t j = 0; j < cols; ++j) out[j] += rows[i * ld + j];
    }
    return sums;
  };
  Tensor b_ih = has_bias ? column_sums(d_gi) : at::empty({0}, options);
  // (Summed again where d_gh is d_gi: cheaper for a few rows than a clone's ~0.65 us.)
  Tensor b_hh = has_bias ? column_sums(d_gh) : at::empty({0}, options);
  return {d_t_times(d_gi, x, I, I), d_t_times(d_gh, h_prev.data_ptr<T>(), h_prev.size(1), h_prev.stride(0)),
          std::move(b_ih), std::move(b_hh),
          dh.has_value() ? d_t_times(*dh, r->data_ptr<T>(), r->size(1), r->stride(0)) : at::empty({0}, options)};
}

// dst = the contiguous tensor src's n values (of dst's type), or zeros where src is undefined
// (an absent state gradient).
template <typename T>
void copy_or_zero(const Tensor& src, int64_t n, T* dst) {
  if (src.defined()) {
    copy_values(dst, src.data_ptr<T>(), n);
  } else {
    std::fill(dst, dst + n, T(0));
  }
}

// dst[i] = a[i] + b[i] for i in [i0, i1), or a[i] where b is null (an absent grad_y).
template <typename T>
void add_rows(int64_t i0, int64_t i1, const T* a, const T* b, T* dst) {
  if (b) {
    for (int64_t i = i0; i < i1; ++i) dst[i] = a[i] + b[i];
  } else {
    copy_values(dst + i0, a + i0, i1 - i0);
  }
}

// Backpropagation through time. Returns, in order: grad of x, h0, c0 (undefined without c),
// w_ih, w_hh, b_ih, b_hh (empty [0] without bias), w_hr (empty [0] without projection).
// need_grad_x=false returns grad_x empty [0] and skips its GEMM; need_grad_weights=false
// likewise every weight and bias gradient (then h_prev is gathered only where the cell reads it).
//
// Steps run in the reverse of the forward's order. Per step: dh = dh_state + grad_y[t]
// (the gradient reaching h_t from above and from the next step), with a projection
// dr = dh @ W_hr; the cell's pointwise backward gives the gate gradients; then
// dh_prev = d_gh @ W_hh. The weight gradients are one GEMM each over all steps afterwards
// (few_rows_weight_grads for a few rows in all).
template <class Cell>
std::vector<Tensor> layer_backward(const OptTensor& grad_y_in, const OptTensor& grad_h_n, const OptTensor& grad_c_n,
                                   const Tensor& x_in, const Tensor& w_ih, const Tensor& w_hh,
                                   const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse,
                                   bool has_bias, const Tensor& y_in, const Tensor& ws_in, const Tensor& h0,
                                   const OptTensor& c0, bool need_grad_x, bool need_grad_weights,
                                   bool need_grad_h0) {
  const LayerSizes sz = check_backward_args<Cell>(kCpuBackend, grad_y_in, grad_h_n, grad_c_n, x_in, w_ih, w_hh,
                                                  w_hr, batch_sizes, y_in, ws_in, h0, c0);
  const Steps& st = sz.steps;
  const int64_t B = st.B, H = sz.H, Hout = sz.Hout, GH = sz.G * sz.H;
  const int64_t ws_cols = sz.ws_cols;
  const int64_t r_col = workspace::proj_col(Cell::kBlocks, H);

  // x [N, I], grad_y and y [N, Hout] as their data (a view each would cost ~0.3 us of a
  // ~10 us one-step backward). An absent grad_y, grad_h_n or grad_c_n is zero.
  const Tensor x = x_in.contiguous();
  const Tensor grad_y = grad_y_in.has_value() ? grad_y_in->contiguous() : Tensor();
  const Tensor grad_h_n_c = grad_h_n.has_value() ? grad_h_n->contiguous() : Tensor();
  const Tensor grad_c_n_c = Cell::kHasCellState && grad_c_n.has_value() ? grad_c_n->contiguous() : Tensor();
  const Tensor y = y_in.contiguous();
  const Tensor ws = ws_in.contiguous();
  const Tensor w_hh_c = w_hh.contiguous();
  const at::TensorOptions options = x.options();

  // The state gradients carried between steps, begun from grad_h_n / grad_c_n (copied in the
  // loop below: a clone costs twice an empty tensor's ~0.25 us).
  Tensor dh_state = at::empty({B, Hout}, options);
  Tensor dc_state = Cell::kHasCellState ? at::empty({B, H}, options) : Tensor();
  // (The large buffers come from the pool of csrc/cpu/scratch.h: no page faults per call.)
  Tensor d_gi = pooled_empty({st.N, GH}, options);
  Tensor d_gh = Cell::kSeparateHiddenGrad ? pooled_empty({st.N, GH}, options) : d_gi;
  // Gradient of each step's h (output + state); with a projection it is kept for dW_hr.
  Tensor dh_all = sz.proj ? pooled_empty({st.N, Hout}, options) : Tensor();
  Tensor dh_buf = at::empty({B, sz.proj ? H : Hout}, options);
  const Tensor h0_c = h0.contiguous();
  const Tensor c0_c = Cell::kHasCellState ? c0->contiguous() : Tensor();
  // h_prev of every row, for the GRU's pointwise backward and for dW_hh: with one step, h0.
  const bool need_h_prev = need_grad_weights || Cell::kReadsHPrevInBackward;
  const bool gather = need_h_prev && st.T > 1;
  const Tensor h_prev_all = gather ? pooled_empty({st.N, Hout}, options) : h0_c;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnext_layer_backward", [&] {
    if (gather) {
      gather_h_prev<scalar_t>(st, reverse, y.data_ptr<scalar_t>(), h0_c.data_ptr<scalar_t>(), Hout,
                              h_prev_all.data_ptr<scalar_t>());
    }
    scalar_t* dh_state_ptr = dh_state.data_ptr<scalar_t>();
    copy_or_zero(grad_h_n_c, B * Hout, dh_state_ptr);
    if (Cell::kHasCellState) copy_or_zero(grad_c_n_c, B * H, dc_state.data_ptr<scalar_t>());
    scalar_t* dh_buf_ptr = dh_buf.data_ptr<scalar_t>();
    const scalar_t* grad_y_ptr = grad_y.defined() ? grad_y.data_ptr<scalar_t>() : nullptr;
    // dh_prev = d_gh @ W_hh is d_gh @ (W_hh^T)^T: the step weight is W_hh^T [Hout, G*H].
    const auto w_hh_step = StepWeight<scalar_t>::transpose_of(w_hh_c, B, st.T);
    // dr = dh @ W_hr likewise: the step weight is W_hr^T [H, Hout].
    const std::optional<StepWeight<scalar_t>> w_hr_step =
        sz.proj ? std::make_optional(StepWeight<scalar_t>::transpose_of(*w_hr, B, st.T)) : std::nullopt;
    BackwardStep<scalar_t> step;
    step.H = H;
    step.Hout = Hout;
    step.dh = dh_buf_ptr;
    step.dh_ld = dh_buf.size(1);
    step.dc_state = Cell::kHasCellState ? dc_state.data_ptr<scalar_t>() : nullptr;
    step.c0 = Cell::kHasCellState ? c0_c.data_ptr<scalar_t>() : nullptr;
    step.ws_ld = ws_cols;
    step.y_ld = Hout;
    step.d_gi_ld = GH;
    step.d_gh_ld = GH;
    step.dh_prev = dh_state_ptr;
    step.dh_prev_ld = Hout;
    for (int64_t s = 0; s < st.T; ++s) {
      const int64_t t = reverse ? s : st.T - 1 - s;  // forward's order, reversed
      const int64_t rows = st.rows[t], off = st.offset[t];
      const scalar_t* grad_y_t = grad_y_ptr ? grad_y_ptr + off * Hout : nullptr;
      if (sz.proj) {
        // dh = dh_state + grad_y[t], kept for dW_hr; dr = dh @ W_hr: [rows, Hout] x [Hout, H]
        scalar_t* dh_t = dh_all.data_ptr<scalar_t>() + off * Hout;
        add_rows(0, rows * Hout, dh_state_ptr, grad_y_t, dh_t);
        w_hr_step->multiply(rows, dh_t, Hout, false, dh_buf_ptr, H);
      }
      step.ws = ws.data_ptr<scalar_t>() + off * ws_cols;
      const int64_t prev = previous_step(st, t, reverse);
      step.ws_prev = prev < 0 ? nullptr : ws.data_ptr<scalar_t>() + st.offset[prev] * ws_cols;
      step.carried = carried_rows(st, t, reverse);
      step.h_prev = need_h_prev ? h_prev_all.data_ptr<scalar_t>() + off * Hout : nullptr;
      step.y = y.data_ptr<scalar_t>() + off * Hout;
      step.d_gi = d_gi.data_ptr<scalar_t>() + off * GH;
      step.d_gh = d_gh.data_ptr<scalar_t>() + off * GH;
      at::parallel_for(0, rows, row_grain(GH), [&](int64_t b0, int64_t b1) {
        if (!sz.proj) add_rows(b0 * Hout, b1 * Hout, dh_state_ptr, grad_y_t, dh_buf_ptr);
        Cell::template backward_rows<scalar_t>(step, b0, b1);
      });
      // dh_prev (+)= d_gh @ W_hh: [rows, G*H] x [G*H, Hout]; the GRU's direct z * dh term is
      // already in dh_state. After the last step it would only be grad_h0.
      if (s + 1 < st.T || need_grad_h0) w_hh_step.multiply(rows, step.d_gh, GH, Cell::kDirectHiddenGrad, dh_state_ptr, Hout);
    }
  });

  // grad_x and the weight gradients: one GEMM each over all steps, no per-step accumulation.
  Tensor grad_x;
  if (need_grad_x) {
    // grad_x = d_gi @ W_ih: [N, G*H] x [G*H, I]; with a few rows in all (a *Cell call, one
    // step of a layer) by our few-row kernel on W_ih's rows as they are (unpacked_nn_rows).
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnext_grad_x", [&] {
      if (st.N <= unpacked_nn_rows<scalar_t>()) {
        grad_x = at::empty(x_in.sizes(), options);
        small_gemm_nn<scalar_t>(st.N, sz.I, GH, d_gi.data_ptr<scalar_t>(), GH, w_ih.data_ptr<scalar_t>(), sz.I,
                                false, grad_x.data_ptr<scalar_t>(), sz.I);
      } else if (OneDnnMatmul::route(d_gi, w_ih)) {
        grad_x = OneDnnMatmul::multiply(d_gi, w_ih).view(x_in.sizes());
      } else {
        const OneDnnLinear input_linear(w_ih.t(), st.N);
        grad_x = (input_linear.available() ? input_linear(d_gi) : at::mm(d_gi, w_ih)).view(x_in.sizes());
      }
    });
  } else {
    grad_x = at::empty({0}, options);
  }
  return backward_outputs(grad_x, dh_state, dc_state, need_grad_h0, need_grad_weights, x, [&] {
    const OptTensor dh = sz.proj ? OptTensor(dh_all) : std::nullopt;
    const OptTensor r = sz.proj ? OptTensor(ws.narrow(1, r_col, H)) : std::nullopt;
    std::vector<Tensor> g;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnext_weight_grads", [&] {
      g = unpacked_tn_route<scalar_t>(st.N, GH, std::max(sz.I, Hout))
              ? few_rows_weight_grads<scalar_t>(d_gi, d_gh, x.data_ptr<scalar_t>(), sz.I, h_prev_all, has_bias, dh, r)
              : weight_grads(d_gi, d_gh, x.view({st.N, sz.I}), h_prev_all, has_bias, dh, r, TransposedProduct{});
    });
    return g;
  });
}

// float16 and bfloat16 run the float32 loops: the op's arguments are widened to float32 at
// its entry and its outputs rounded back, except the workspace, which stays float32
// (workspace_dtype, ../layer_checks.h). So the values are loaded and stored in the input
// dtype while the gate math, the state carried between steps and every GEMM's accumulation
// are float32. The arguments are checked before widening, so mixed dtypes are still rejected.
// Contiguous too: the loops would copy a strided widened tensor (a batch_first x) once more.
inline Tensor widen(const Tensor& t) { return t.to(at::kFloat, false, false, at::MemoryFormat::Contiguous); }
inline OptTensor widen(const OptTensor& t) { return t.has_value() ? OptTensor(widen(*t)) : t; }
inline Tensor narrow_to(const Tensor& t, at::ScalarType dtype) { return t.defined() ? t.to(dtype) : t; }

// The CPU time loop, as csrc/layer_ops.h takes it.
struct CpuLoop {
  template <class Cell>
  static std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& x, const Tensor& h0, const OptTensor& c0,
                                                            const Tensor& w_ih, const Tensor& w_hh,
                                                            const OptTensor& b_ih, const OptTensor& b_hh,
                                                            const OptTensor& w_hr, const OptTensor& batch_sizes,
                                                            bool reverse, bool need_backward) {
    if (!is_half(x.scalar_type())) {
      return layer_forward<Cell>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, need_backward);
    }
    check_forward_args<Cell>(kCpuBackend, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
    // bfloat16: x and W_ih as they are too, for the input projection's bfloat16 dot products
    // (where Bf16StepWeight::takes it).
    std::optional<Bf16Inputs> bf16;
    if (x.scalar_type() == at::kBFloat16) {
      const Tensor rows = x.dim() == 3 ? x.contiguous().view({x.size(0) * x.size(1), x.size(2)}) : x.contiguous();
      bf16 = Bf16Inputs{rows, w_ih.contiguous()};
    }
    auto out = layer_forward<Cell>(widen(x), widen(h0), widen(c0), widen(w_ih), widen(w_hh), widen(b_ih),
                                   widen(b_hh), widen(w_hr), batch_sizes, reverse, need_backward, bf16);
    const auto dtype = x.scalar_type();
    return {narrow_to(std::get<0>(out), dtype), narrow_to(std::get<1>(out), dtype),
            narrow_to(std::get<2>(out), dtype), std::get<3>(out)};
  }

  template <class Cell>
  static std::vector<Tensor> backward(const OptTensor& grad_y, const OptTensor& grad_h_n, const OptTensor& grad_c_n,
                                      const Tensor& x, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& w_hr,
                                      const OptTensor& batch_sizes, bool reverse, bool has_bias, const Tensor& y,
                                      const Tensor& ws, const Tensor& h0, const OptTensor& c0, bool need_grad_x,
                                      bool need_grad_weights, bool need_grad_h0) {
    if (!is_half(x.scalar_type())) {
      return layer_backward<Cell>(grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, batch_sizes, reverse, has_bias,
                                  y, ws, h0, c0, need_grad_x, need_grad_weights, need_grad_h0);
    }
    check_backward_args<Cell>(kCpuBackend, grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, batch_sizes, y, ws, h0,
                              c0);
    std::vector<Tensor> grads =
        layer_backward<Cell>(widen(grad_y), widen(grad_h_n), widen(grad_c_n), widen(x), widen(w_ih), widen(w_hh),
                             widen(w_hr), batch_sizes, reverse, has_bias, widen(y), ws, widen(h0), widen(c0),
                             need_grad_x, need_grad_weights, need_grad_h0);
    for (Tensor& g : grads) g = narrow_to(g, x.scalar_type());
    return grads;
  }
};

}  // namespace cpu
}  // namespace rnnext
