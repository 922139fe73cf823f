// The CUDA time loop of one layer in one direction, written once for every cell type.
//
// The standard algorithm (cuDNN's and haste's): the input projection gi = x @ W_ih^T is one
// cuBLAS GEMM over all steps; per step one GEMM gh = h_prev @ W_hh^T into a preallocated
// buffer and one fused pointwise kernel that adds the biases, calls the gate math of
// ../cell_math.h and writes h (and c) and, in training, the workspace (../workspace.h).
// Backward runs the steps in reverse: one pointwise kernel (the cell's backward) and one
// GEMM dh_prev = d_gh @ W_hh per step; the weight gradients are single GEMMs over all steps
// after the loop and the bias gradients column sums: no atomics, so a result is the same
// bit for bit from run to run. No host synchronisation and no allocation inside the loops:
// the step layout is host data (batch_sizes is a CPU tensor) and every buffer is made before.
//
// A cell type plugs in through a policy struct (rnn.cu, gru.cu, lstm.cu) with two device
// functions, forward(ForwardStep, b, j) and backward(BackwardStep, b, j), for one hidden unit
// j of one batch row b. float16 and bfloat16 are loaded, computed in float (at::opmath_type)
// and stored back; the GEMMs accumulate in float too (cuBLAS, as torch.mm). float32 GEMMs
// follow torch's TF32 setting (torch.backends.cuda.matmul.allow_tf32, off by default).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include <tuple>
#include <vector>

#include "../cell_math.h"
#include "../layer_ops.h"

namespace rnnext {
namespace cuda {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

// Row-major C[m, n] (ldc) = A[m, k] (lda) @ op(B) (+ C when accumulate), with op(B) = B^T for
// B stored [n, k] (b_transposed, e.g. a weight used as x @ W^T) or B stored [k, n]. cuBLAS is
// column-major, where the same memory holds C^T = op(B)^T A^T: so B comes first.
//
// Straight to cuBLAS on raw pointers (a call through the dispatcher on per-step views costs
// more host time than a small step's GEMM takes on the GPU), on torch's handle for the current
// stream (taken once per op call), which also carries torch's TF32 setting as its math mode. ATen's own gemm wrappers
// are not exported by every torch build (2.14's libtorch_cuda hides them), so setup.py links
// cuBLAS itself: the same library, by soname, that torch has loaded. float16 and bfloat16
// accumulate in float.
template <typename T>
void gemm_rows(cublasHandle_t handle, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
               int64_t ldb, bool b_transposed, bool accumulate, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  TORCH_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX && ldc <= INT_MAX,
              "rnnext: a per-step product of [", m, ", ", k, "] x [", k, ", ", n, "] is too large for cuBLAS's 32-bit sizes");
  const cublasOperation_t op_b = b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int cm = static_cast<int>(n), cn = static_cast<int>(m), ck = static_cast<int>(k);
  cublasStatus_t status;
  if constexpr (std::is_same_v<T, double>) {
    const double one = 1, beta = accumulate ? 1 : 0;
    status = cublasDgemm(handle, op_b, CUBLAS_OP_N, cm, cn, ck, &one, b, static_cast<int>(ldb), a,
                         static_cast<int>(lda), &beta, c, static_cast<int>(ldc));
  } else if constexpr (std::is_same_v<T, float>) {
    const float one = 1, beta = accumulate ? 1 : 0;
    status = cublasSgemm(handle, op_b, CUBLAS_OP_N, cm, cn, ck, &one, b, static_cast<int>(ldb), a,
                         static_cast<int>(lda), &beta, c, static_cast<int>(ldc));
  } else {
    static_assert(std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>, "gemm_rows: unsupported dtype");
    const cudaDataType_t type = std::is_same_v<T, at::Half> ? CUDA_R_16F : CUDA_R_16BF;
    const float one = 1, beta = accumulate ? 1 : 0;
    status = cublasGemmEx(handle, op_b, CUBLAS_OP_N, cm, cn, ck, &one, b, type, static_cast<int>(ldb), a, type,
                          static_cast<int>(lda), &beta, c, type, static_cast<int>(ldc), CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT);
  }
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "rnnext: cuBLAS gemm failed: ", cublasGetStatusString(status));
}

// What the pointwise forward of one step reads and writes; rows are the step's batch rows.
template <typename T>
struct ForwardStep {
  int64_t rows, H, G;
  const T* gi;              // [rows, G*H] x_t @ W_ih^T (no bias)
  const T* gh;              // [rows, G*H] h_prev @ W_hh^T (no bias)
  const T* b_ih;            // [G*H] or nullptr (no bias)
  const T* b_hh;            // [G*H] or nullptr
  const T* h_prev;          // [rows, Hout]
  int64_t h_prev_ld;
  T* c_state;               // [rows, H] LSTM: c_prev in, c out
  T* ws;                    // [rows, ws_cols] or nullptr in inference
  int64_t ws_ld;
  T* h_out;                 // [rows, H] h, or r = o * tanh(c) with a projection
  int64_t h_out_ld;

  // Pre-activation of gate g of unit j in row b, input side and hidden side, each with its
  // bias, in the compute type (float for float16/bfloat16).
  __device__ __forceinline__ at::opmath_type<T> in(int64_t b, int64_t g, int64_t j) const {
    using A = at::opmath_type<T>;
    const int64_t k = g * H + j;
    return A(gi[b * G * H + k]) + (b_ih ? A(b_ih[k]) : A(0));
  }
  __device__ __forceinline__ at::opmath_type<T> hid(int64_t b, int64_t g, int64_t j) const {
    using A = at::opmath_type<T>;
    const int64_t k = g * H + j;
    return A(gh[b * G * H + k]) + (b_hh ? A(b_hh[k]) : A(0));
  }
};

// What the pointwise backward of one step reads and writes.
template <typename T>
struct BackwardStep {
  int64_t rows, H, G;
  const T* dh_a;            // gradient of h (or of r with a projection) = dh_a + dh_b
  int64_t dh_a_ld;
  const T* dh_b;            // grad_y[t] without a projection, else nullptr
  int64_t dh_b_ld;
  const T* ws;              // [rows, ws_cols] this step's workspace rows
  int64_t ws_ld;
  // LSTM c_prev: the previous step's workspace rows for rows b < carried, else c0 [B, H].
  const T* ws_prev;
  int64_t carried;
  const T* c0;
  T* dc_state;              // [rows, H] LSTM: dc of c_t in, of c_prev out
  const T* h_prev;          // [rows, Hout] (GRU)
  int64_t h_prev_ld;
  const T* y;               // [rows, Hout] this step's output h_t (RNN)
  int64_t y_ld;
  T* d_gi;                  // [rows, G*H] input-side gate gradients
  T* d_gh;                  // [rows, G*H] hidden side (GRU; else the same as d_gi)
  T* dh_prev;               // [rows, Hout] GRU writes its direct z * dh term here
  int64_t dh_prev_ld;

  __device__ __forceinline__ at::opmath_type<T> dh(int64_t b, int64_t j) const {
    using A = at::opmath_type<T>;
    return A(dh_a[b * dh_a_ld + j]) + (dh_b ? A(dh_b[b * dh_b_ld + j]) : A(0));
  }
};

template <class Cell, typename T>
__global__ void forward_kernel(ForwardStep<T> s) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.rows * s.H) return;
  Cell::forward(s, idx / s.H, idx % s.H);
}

template <class Cell, typename T>
__global__ void backward_kernel(BackwardStep<T> s) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.rows * s.H) return;
  Cell::backward(s, idx / s.H, idx % s.H);
}

// out[r, j] = a[r, j] + b[r, j] over [rows, cols], all with leading dimension cols.
template <typename T>
__global__ void add_kernel(int64_t n, const T* a, const T* b, T* out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  using A = at::opmath_type<T>;
  out[idx] = T(A(a[idx]) + A(b[idx]));
}

template <typename T>
void copy_rows(T* dst, const T* src, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows <= 0) return;
  C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(T) * rows * cols, cudaMemcpyDeviceToDevice, stream));
}

// h_prev of every row [N, Hout]: the row's previous output where its sequence had a previous
// step, else its initial state (the workspace rule of ../workspace.h). Padded, that is two
// copies; packed, two per step.
template <typename T>
void gather_h_prev(const Steps& st, bool reverse, bool packed, const T* y, const T* h0, int64_t Hout, T* h_prev,
                   cudaStream_t stream) {
  const int64_t B = st.B;
  if (!packed) {
    const int64_t rest = (st.T - 1) * B;
    if (reverse) {
      copy_rows(h_prev, y + B * Hout, rest, Hout, stream);
      copy_rows(h_prev + rest * Hout, h0, B, Hout, stream);
    } else {
      copy_rows(h_prev, h0, B, Hout, stream);
      copy_rows(h_prev + B * Hout, y, rest, Hout, stream);
    }
    return;
  }
  for (int64_t t = 0; t < st.T; ++t) {
    const int64_t rows = st.rows[t], off = st.offset[t];
    const int64_t prev = previous_step(st, t, reverse);
    const int64_t carried = carried_rows(st, t, reverse);
    if (carried > 0) copy_rows(h_prev + off * Hout, y + st.offset[prev] * Hout, carried, Hout, stream);
    copy_rows(h_prev + (off + carried) * Hout, h0 + carried * Hout, rows - carried, Hout, stream);
  }
}

template <typename T>
T* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Forward over the whole sequence: (y [T, B, Hout] or [N, Hout], h_n [B, Hout], c_n [B, H]
// or undefined, workspace [N, ws_cols] or [0, ws_cols] without need_backward).
template <class Cell>
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(const Tensor& x_in, const Tensor& h0, const OptTensor& c0,
                                                         const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                         const OptTensor& b_hh, const OptTensor& w_hr,
                                                         const OptTensor& batch_sizes, bool reverse,
                                                         bool need_backward) {
  const LayerSizes sz =
      check_forward_args<Cell>(kCudaBackend, x_in, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Steps& st = sz.steps;
  const int64_t B = st.B, H = sz.H, Hout = sz.Hout, GH = sz.G * sz.H;
  const int64_t ws_cols = sz.ws_cols;
  const int64_t r_col = workspace::proj_col(Cell::kBlocks, H);

  const Tensor x = x_in.contiguous().view({st.N, sz.I});
  const Tensor w_hh_c = w_hh.contiguous();
  const Tensor w_hr_c = sz.proj ? w_hr->contiguous() : Tensor();
  const Tensor b_ih_c = b_ih.has_value() ? b_ih->contiguous() : Tensor();
  const Tensor b_hh_c = b_hh.has_value() ? b_hh->contiguous() : Tensor();
  // gi = x @ W_ih^T for every step at once: [N, I] x [I, G*H]
  const Tensor gi = at::mm(x, w_ih.t());
  Tensor y = x.new_empty({st.N, Hout});
  Tensor ws = x.new_empty({need_backward ? st.N : 0, ws_cols});
  Tensor r_buf = (sz.proj && !need_backward) ? x.new_empty({B, H}) : Tensor();  // o * tanh(c)
  Tensor h_state = h0.contiguous().clone();  // initial state in, final state out
  Tensor c_state = Cell::kHasCellState ? c0->contiguous().clone() : Tensor();
  Tensor gh = x.new_empty({B, GH});
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();  // bound to `stream`

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rnnext_cuda_layer_forward", [&] {
    using T = scalar_t;
    T* h_ptr = h_state.data_ptr<T>();
    T* y_ptr = y.data_ptr<T>();
    T* ws_ptr = need_backward ? ws.data_ptr<T>() : nullptr;
    const T* w_hh_ptr = w_hh_c.data_ptr<T>();
    ForwardStep<T> step;
    step.H = H;
    step.G = sz.G;
    step.gh = gh.data_ptr<T>();
    step.b_ih = data_or_null<T>(b_ih_c);
    step.b_hh = data_or_null<T>(b_hh_c);
    step.h_prev_ld = Hout;
    step.c_state = data_or_null<T>(c_state);
    step.ws_ld = ws_cols;
    step.h_out_ld = sz.proj ? (need_backward ? ws_cols : H) : Hout;
    for (int64_t s = 0; s < st.T; ++s) {
      const int64_t t = reverse ? st.T - 1 - s : s;
      const int64_t rows = st.rows[t], off = st.offset[t];
      // h_prev [rows, Hout]: the previous step's output rows, or the initial state. Only a
      // packed sequence in reverse grows: rows past the previous step's begin here from h0,
      // which h_state still holds.
      const int64_t prev = previous_step(st, t, reverse);
      const T* h_prev = h_ptr;
      if (prev >= 0) {
        const T* y_prev = y_ptr + st.offset[prev] * Hout;
        if (st.rows[prev] >= rows) {
          h_prev = y_prev;
        } else {
          copy_rows(h_ptr, y_prev, st.rows[prev], Hout, stream);
        }
      }
      // gh = h_prev @ W_hh^T: [rows, Hout] x [Hout, G*H]
      gemm_rows<T>(blas, rows, GH, Hout, h_prev, Hout, w_hh_ptr, Hout, true, false, gh.data_ptr<T>(), GH);
      step.rows = rows;
      step.gi = gi.data_ptr<T>() + off * GH;
      step.h_prev = h_prev;
      step.ws = ws_ptr ? ws_ptr + off * ws_cols : nullptr;
      step.h_out = !sz.proj ? y_ptr + off * Hout : need_backward ? ws_ptr + off * ws_cols + r_col : r_buf.data_ptr<T>();
      if (rows * H > 0) {
        forward_kernel<Cell, T><<<blocks_for(rows * H), kThreads, 0, stream>>>(step);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (sz.proj) {
        // h = r @ W_hr^T: [rows, H] x [H, Hout]
        gemm_rows<T>(blas, rows, Hout, H, step.h_out, step.h_out_ld, w_hr_c.data_ptr<T>(), H, true, false,
                     y_ptr + off * Hout, Hout);
      }
    }
    // h_n: each row's output at the last step that processed it. Forward, rows end as
    // batch_sizes falls; in reverse every row ends at step 0, which holds all B rows.
    for (int64_t t = 0; t < st.T; ++t) {
      const int64_t later = reverse ? (t == 0 ? 0 : st.rows[t]) : (t + 1 < st.T ? st.rows[t + 1] : 0);
      copy_rows(h_ptr + later * Hout, y_ptr + (st.offset[t] + later) * Hout, st.rows[t] - later, Hout, stream);
    }
  });

  if (x_in.dim() == 3) y = y.view({st.T, B, Hout});
  return {y, h_state, c_state, ws};
}

// Backpropagation through time: [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih,
// grad_b_hh, grad_w_hr], as the CPU's layer_backward (empty [0] for what is absent or not
// asked for: need_grad_x, need_grad_weights).
template <class Cell>
std::vector<Tensor> layer_backward(const OptTensor& grad_y_in, const OptTensor& grad_h_n, const OptTensor& grad_c_n,
                                   const Tensor& x_in, const Tensor& w_ih, const Tensor& w_hh,
                                   const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse,
                                   bool has_bias, const Tensor& y_in, const Tensor& ws_in, const Tensor& h0,
                                   const OptTensor& c0, bool need_grad_x, bool need_grad_weights,
                                   bool need_grad_h0) {
  const LayerSizes sz = check_backward_args<Cell>(kCudaBackend, grad_y_in, grad_h_n, grad_c_n, x_in, w_ih, w_hh,
                                                  w_hr, batch_sizes, y_in, ws_in, h0, c0);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Steps& st = sz.steps;
  const int64_t B = st.B, H = sz.H, Hout = sz.Hout, GH = sz.G * sz.H;
  const int64_t ws_cols = sz.ws_cols;
  const int64_t r_col = workspace::proj_col(Cell::kBlocks, H);

  const Tensor x = x_in.contiguous().view({st.N, sz.I});
  // An absent output gradient is zero: made here, so the kernels below read one as given.
  const Tensor grad_y = grad_y_in.has_value() ? grad_y_in->contiguous().view({st.N, Hout})
                                              : at::zeros({st.N, Hout}, x_in.options());
  const Tensor y = y_in.contiguous().view({st.N, Hout});
  const Tensor ws = ws_in.contiguous();
  const Tensor w_hh_c = w_hh.contiguous();
  const Tensor w_hr_c = sz.proj ? w_hr->contiguous() : Tensor();
  const Tensor h0_c = h0.contiguous();
  const Tensor c0_c = Cell::kHasCellState ? c0->contiguous() : Tensor();

  Tensor dh_state = grad_h_n.has_value() ? grad_h_n->contiguous().clone() : at::zeros({B, Hout}, x_in.options());
  Tensor dc_state = !Cell::kHasCellState       ? Tensor()
                    : grad_c_n.has_value() ? grad_c_n->contiguous().clone()
                                           : at::zeros({B, H}, x_in.options());
  Tensor d_gi = x.new_empty({st.N, GH});
  Tensor d_gh = Cell::kSeparateHiddenGrad ? x.new_empty({st.N, GH}) : d_gi;
  // With a projection: each step's dh (kept for dW_hr) and dr = dh @ W_hr.
  Tensor dh_all = sz.proj ? x.new_empty({st.N, Hout}) : Tensor();
  Tensor dr_buf = sz.proj ? x.new_empty({B, H}) : Tensor();
  const bool need_h_prev = need_grad_weights || Cell::kReadsHPrevInBackward;
  Tensor h_prev_all = x.new_empty({need_h_prev ? st.N : 0, Hout});
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();  // bound to `stream`

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rnnext_cuda_layer_backward", [&] {
    using T = scalar_t;
    if (need_h_prev) {
      gather_h_prev<T>(st, reverse, batch_sizes.has_value(), y.data_ptr<T>(), h0_c.data_ptr<T>(), Hout,
                       h_prev_all.data_ptr<T>(), stream);
    }
    T* dh_state_ptr = dh_state.data_ptr<T>();
    const T* grad_y_ptr = grad_y.data_ptr<T>();
    const T* ws_ptr = ws.data_ptr<T>();
    BackwardStep<T> step;
    step.H = H;
    step.G = sz.G;
    step.ws_ld = ws_cols;
    step.c0 = data_or_null<T>(c0_c);
    step.dc_state = data_or_null<T>(dc_state);
    step.h_prev_ld = Hout;
    step.y_ld = Hout;
    step.dh_prev = dh_state_ptr;
    step.dh_prev_ld = Hout;
    for (int64_t s = 0; s < st.T; ++s) {
      const int64_t t = reverse ? s : st.T - 1 - s;  // forward's order, reversed
      const int64_t rows = st.rows[t], off = st.offset[t];
      const T* grad_y_t = grad_y_ptr + off * Hout;
      if (sz.proj) {
        // dh = dh_state + grad_y[t], kept for dW_hr; dr = dh @ W_hr: [rows, Hout] x [Hout, H]
        T* dh_t = dh_all.data_ptr<T>() + off * Hout;
        if (rows * Hout > 0) {
          add_kernel<T><<<blocks_for(rows * Hout), kThreads, 0, stream>>>(rows * Hout, dh_state_ptr, grad_y_t, dh_t);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        gemm_rows<T>(blas, rows, H, Hout, dh_t, Hout, w_hr_c.data_ptr<T>(), H, false, false, dr_buf.data_ptr<T>(), H);
        step.dh_a = dr_buf.data_ptr<T>();
        step.dh_a_ld = H;
        step.dh_b = nullptr;
        step.dh_b_ld = 0;
      } else {
        step.dh_a = dh_state_ptr;
        step.dh_a_ld = Hout;
        step.dh_b = grad_y_t;
        step.dh_b_ld = Hout;
      }
      const int64_t prev = previous_step(st, t, reverse);
      step.rows = rows;
      step.ws = ws_ptr + off * ws_cols;
      step.ws_prev = prev < 0 ? nullptr : ws_ptr + st.offset[prev] * ws_cols;
      step.carried = carried_rows(st, t, reverse);
      step.h_prev = need_h_prev ? h_prev_all.data_ptr<T>() + off * Hout : nullptr;
      step.y = y.data_ptr<T>() + off * Hout;
      step.d_gi = d_gi.data_ptr<T>() + off * GH;
      step.d_gh = d_gh.data_ptr<T>() + off * GH;
      if (rows * H > 0) {
        backward_kernel<Cell, T><<<blocks_for(rows * H), kThreads, 0, stream>>>(step);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // dh_prev (+)= d_gh @ W_hh: [rows, G*H] x [G*H, Hout]; the GRU's direct z * dh term is
      // already in dh_state. After the last step it would only be grad_h0.
      if (s + 1 < st.T || need_grad_h0) {
        gemm_rows<T>(blas, rows, Hout, GH, step.d_gh, GH, w_hh_c.data_ptr<T>(), Hout, false, Cell::kDirectHiddenGrad,
                     dh_state_ptr, Hout);
      }
    }
  });

  // grad_x and the weight gradients: one GEMM each over all steps, no per-step accumulation.
  Tensor grad_x = need_grad_x ? at::mm(d_gi, w_ih).view(x_in.sizes()) : x.new_empty({0});
  return backward_outputs(grad_x, dh_state, dc_state, need_grad_h0, need_grad_weights, x, [&] {
    return weight_grads(d_gi, d_gh, x, h_prev_all, has_bias, sz.proj ? OptTensor(dh_all) : std::nullopt,
                        sz.proj ? OptTensor(ws.narrow(1, r_col, H)) : std::nullopt);
  });
}

// The CUDA time loop, as ../layer_ops.h takes it.
struct CudaLoop {
  template <class Cell, class... Args>
  static auto forward(Args&&... args) {
    return layer_forward<Cell>(std::forward<Args>(args)...);
  }
  template <class Cell, class... Args>
  static auto backward(Args&&... args) {
    return layer_backward<Cell>(std::forward<Args>(args)...);
  }
};

}  // namespace cuda
}  // namespace rnnext
