// rnnext::_step_gemm on the CPU: one product of the per-step float32 GEMM (packed_gemm.h) on
// a route the caller names, so tests can reach every kernel this CPU has, and each kernel's
// remainder paths (row blocks, partial strips, K blocks), without a layer around it; also
// the few-row kernels of an unpacked weight (gemm.h: "small_nt", "small_nn") and of the
// weight gradients ("small_tn"), the weight gradients' oneDNN route ("onednn_tn"), and the
// bfloat16 input projection's kernel ("bf16": a and w bfloat16, c float32; packed_gemm_bf16.h).
#include <torch/library.h>

#include <limits>

#include "gemm.h"
#include "packed_gemm_bf16.h"

namespace rnnext {
namespace cpu {
namespace {

// a [m, k] (rows at any stride, elements contiguous), w [n, k] (any strides), c [m, n]
// -> (accumulate ? c : 0) + a @ w^T (+ bias [n] on the per-step routes, without accumulate:
// added by the packed GEMM as it stores each tile, as StepWeight::multiply_bias), computed
// in a buffer whose rows are 5 floats longer than n (so ldc != n is exercised), NaN past
// column n: the result is a view of that new buffer, and a test can see that no route
// wrote past its columns.
at::Tensor step_gemm(const at::Tensor& a, const at::Tensor& w, const at::Tensor& c, c10::string_view route,
                     bool accumulate, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && c.dim() == 2, "rnnext::_step_gemm: a, w and c must be 2-D");
  const int64_t m = a.size(0), k = a.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k && c.size(0) == m && c.size(1) == n, "rnnext::_step_gemm: shapes ", a.sizes(), " x ",
              w.sizes(), "^T -> ", c.sizes(), " do not agree");
  TORCH_CHECK(a.stride(1) == 1 || k <= 1, "rnnext::_step_gemm: a's rows must be contiguous");
  const int64_t ldc = n + 5;
  at::Tensor out = at::full({m, ldc}, std::numeric_limits<double>::quiet_NaN(), c.options()).narrow(1, 0, n);
  out.copy_(c);
  const int64_t lda = std::max<int64_t>(a.stride(0), 1);
  // The few-row kernels of an unpacked weight (float32 and float64): W as it is ([n, k] rows
  // contiguous: small_gemm_nt), or W^T's storage ([k, n] rows contiguous: small_gemm_nn);
  // or the weight gradient's kernel over k rows (small_gemm_tn); at the widest vectors this
  // CPU has, or at those a suffix names ("small_nt@32": AVX2's).
  const std::string name(route);
  const std::string few_rows = name.substr(0, name.find('@'));
  const bool few_row_route = few_rows == "small_nt" || few_rows == "small_nn" || few_rows == "small_tn";
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat &&
                                    !accumulate && !few_row_route && name != "onednn_tn"),
              "rnnext::_step_gemm: a bias is a float32 [n] for the per-step routes, without accumulate");
  if (few_row_route) {
    int bytes = 0;
    if (few_rows.size() < name.size()) {
      const std::string width = name.substr(few_rows.size() + 1);
      TORCH_CHECK_VALUE(width == "16" || width == "32" || width == "64", "rnnext::_step_gemm: route='", name,
                        "': the vector width must be 16, 32 or 64 bytes");
      bytes = std::stoi(width);
    }
    TORCH_CHECK(a.scalar_type() == w.scalar_type() && c.scalar_type() == w.scalar_type() &&
                    (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble),
                "rnnext::_step_gemm: float32 or float64, all three alike");
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "rnnext_step_gemm", [&] {
      if (few_rows == "small_nt") {
        const at::Tensor wc = w.contiguous();
        small_gemm_nt<scalar_t>(m, n, k, a.data_ptr<scalar_t>(), lda, wc.data_ptr<scalar_t>(), k, accumulate,
                                out.data_ptr<scalar_t>(), ldc, bytes);
      } else if (few_rows == "small_nn") {
        const at::Tensor wt = w.t().contiguous();
        small_gemm_nn<scalar_t>(m, n, k, a.data_ptr<scalar_t>(), lda, wt.data_ptr<scalar_t>(), n, accumulate,
                                out.data_ptr<scalar_t>(), ldc, bytes);
      } else {
        // as the weight gradient D^T @ X with D = a^T [k, m] and X = w^T [k, n]
        const at::Tensor d = a.t().contiguous(), x = w.t().contiguous();
        small_gemm_tn<scalar_t>(m, n, k, d.data_ptr<scalar_t>(), m, x.data_ptr<scalar_t>(), n, accumulate,
                                out.data_ptr<scalar_t>(), ldc, bytes);
      }
    });
    return out;
  }
  if (name == "bf16") {
    // as Bf16StepWeight packs and multiplies (W contiguous), on a CPU with AVX512-BF16
    TORCH_CHECK(a.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && c.scalar_type() == at::kFloat,
                "rnnext::_step_gemm: route bf16 takes bfloat16 a and w, and a float32 c");
    TORCH_CHECK(!accumulate, "rnnext::_step_gemm: route bf16 does not accumulate");
    TORCH_CHECK_VALUE(RNNEXT_HAVE_BF16_GEMM,
                      "rnnext::_step_gemm: route='bf16': not built (it needs x86-64 and GCC >= 10 or clang)");
    TORCH_CHECK_VALUE(packed_gemm::cpu_has_bf16_dot(), "rnnext::_step_gemm: route='bf16': this CPU has no AVX512-BF16");
    const Bf16StepWeight packed(w.contiguous());
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    packed.multiply_bias(m, a.data_ptr<at::BFloat16>(), lda, bias_c.defined() ? bias_c.data_ptr<float>() : nullptr,
                         out.data_ptr<float>(), ldc);
    return out;
  }
  TORCH_CHECK(a.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat,
              "rnnext::_step_gemm: float32 only");
  if (name == "onednn_tn") {
    // the weight gradients' oneDNN route (TransposedProduct: OneDnnMatmul on d^T), at any
    // size where this CPU has it (elsewhere at::mm): as D^T @ X with D = a^T [k, m] and
    // X = w^T [k, n], X's rows 3 apart wider than n (as the workspace's r is)
    const at::Tensor d = a.t().contiguous();
    const at::Tensor x = at::empty({k, n + 3}, w.options()).narrow(1, 0, n).copy_(w.t());
    at::Tensor product = TransposedProduct(/*any_size=*/true)(d, x);
    out.copy_(accumulate ? product + c : product);
    return out;
  }
  const packed_gemm::Kernel kernel = packed_gemm::parse_kernel(std::string(route), "route");
  // The packed GEMM's bias (added as each tile is stored); the BLAS route starts c from it.
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* bias_ptr = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  if (kernel == packed_gemm::Kernel::kNone) {
    const at::Tensor wc = w.contiguous();
    if (bias_ptr) out.copy_(bias_c.expand({m, n}));
    gemm<float>(false, true, m, n, k, a.data_ptr<float>(), lda, wc.data_ptr<float>(), k, accumulate || bias_ptr,
                out.data_ptr<float>(), ldc);
  } else {
    at::Tensor packed = pooled_empty({packed_gemm::packed_size(n, k)}, w.options());  // as StepWeight
    packed_gemm::pack(w.data_ptr<float>(), n, k, w.stride(0), w.stride(1), packed.data_ptr<float>());
    packed_gemm::multiply(kernel, m, n, k, a.data_ptr<float>(), lda, packed.data_ptr<float>(), accumulate,
                          out.data_ptr<float>(), ldc, /*streaming=*/false, bias_ptr);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) { m.impl("_step_gemm", &step_gemm); }

}  // namespace cpu
}  // namespace rnnext
