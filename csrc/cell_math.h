// Per-element gate math of every cell, forward and backward, written once.
//
// These functions are called by the CPU time loops (csrc/cpu/*.cpp) and are marked so that
// CUDA kernels can call the very same code. They work on one hidden unit j of one batch row;
// the loops supply the pre-activations and saved values.
//
// Shape legend used across csrc/:
//   T  time steps, B batch rows (packed: rows active at step t = batch_sizes[t], B = max)
//   N  rows of the flattened sequence: T*B padded, sum(batch_sizes) packed
//   I  input features, H hidden units, Hout = proj_size if an LSTM projection is used, else H
//   G  gates per cell: RNN 1, GRU 3 (r, z, n), LSTM 4 (i, f, g, o), torch.nn's order
//   gi [N, G*H]  x @ W_ih^T + b_ih       gh [B, G*H]  h_prev @ W_hh^T (+ b_hh)
//
// Derivatives are taken from saved activations: sigmoid' = y (1 - y), tanh' = 1 - y^2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define RNNEXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RNNEXT_HOST_DEVICE inline
#endif

namespace rnnext {
namespace math {

// exp and tanh. On the device: the CUDA math library. On the host: branch-free Cephes-style
// versions (range reduction x = n ln2 + r, a polynomial (float) or rational (double) e^r,
// times 2^n made from the exponent bits; about 1.5 ulp) that compilers vectorise, unlike a
// call into libm, so the pointwise passes run at SIMD width. x is clamped so that n stays in
// [-127, 128] (float) or [-1023, 1024] (double), whose exponent bits are those of 0 and of
// +inf: the result saturates to 0 and to +inf as libm's does (slightly early: from
// x = 88.38 rather than 88.72 in float, 709.09 rather than 709.78 in double), so a gate
// that saturates is exactly 0 or 1 and 0 * inf gives NaN where torch's does. n comes out of
// the rounding constant's low bits (n + 1.5 * 2^23, or 2^52, holds n there): no float is
// converted to an integer (nor a NaN: for a NaN x, e_r is NaN and so is the result).
template <typename T, typename Bits, int kMantissa, int kBias>
RNNEXT_HOST_DEVICE T pow2_(T n) {
  constexpr T kRound = T(3) * T(Bits(1) << (kMantissa - 1));  // 1.5 * 2^kMantissa
  const T shifted = n + kRound;
  Bits n_bits, round_bits;
  memcpy(&n_bits, &shifted, sizeof(n_bits));
  memcpy(&round_bits, &kRound, sizeof(round_bits));
  using UBits = typename std::make_unsigned<Bits>::type;
  const Bits bits = static_cast<Bits>(static_cast<UBits>(n_bits - round_bits + kBias) << kMantissa);
  T out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}

RNNEXT_HOST_DEVICE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  constexpr float kHigh = 88.72283935546875f;  // log(FLT_MAX): n = 128 from here on
  constexpr float kLow = -88.0296919311f;      // n = -127 (a result of 0) below
  x = x < kLow ? kLow : (x > kHigh ? kHigh : x);  // NaN stays NaN
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2 in two parts
  const float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                   1.6666665459e-1f) * r + 5.0000001201e-1f;
  return (p * r * r + r + 1.0f) * pow2_<float, int32_t, 23, 127>(n);
#endif
}

// Cephes exp: e^r = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)) on |r| <= ln2 / 2.
RNNEXT_HOST_DEVICE double exp_(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  constexpr double kHigh = 709.782712893383973096;  // log(DBL_MAX): n = 1024 from here on
  constexpr double kLow = -709.436139303104;        // n = -1023 (a result of 0) below
  x = x < kLow ? kLow : (x > kHigh ? kHigh : x);    // NaN stays NaN
  const double n = floor(x * 1.4426950408889634073599 + 0.5);
  const double r = x - n * 6.93145751953125E-1 - n * 1.42860682030941723212E-6;
  const double rr = r * r;
  const double px = r * ((1.26177193074810590878E-4 * rr + 3.02994407707441961300E-2) * rr + 9.99999999999999999910E-1);
  const double qx = ((3.00198505138664455042E-6 * rr + 2.52448340349684104192E-3) * rr + 2.27265548208155028766E-1) * rr +
                    2.00000000000000000009E0;
  return (1.0 + 2.0 * px / (qx - px)) * pow2_<double, int64_t, 52, 1023>(n);
#endif
}

// tanh(x) = sign(x) (1 - 2 / (e^{2|x|} + 1)), and an odd polynomial below |x| < 0.625 where
// that form loses relative precision (Cephes tanhf).
RNNEXT_HOST_DEVICE float tanh_(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  const float ax = x < 0.f ? -x : x;
  const float big = 1.f - 2.f / (exp_(2.f * ax) + 1.f);
  const float z = x * x;
  const float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                        1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
  const float signed_big = x < 0.f ? -big : big;
  return ax < 0.625f ? small : signed_big;
#endif
}
// Cephes tanh: x + x z P(z) / Q(z), z = x^2, below |x| < 0.625; above, as the float one.
RNNEXT_HOST_DEVICE double tanh_(double x) {
#if defined(__CUDA_ARCH__)
  return tanh(x);
#else
  const double ax = x < 0.0 ? -x : x;
  const double big = 1.0 - 2.0 / (exp_(2.0 * ax) + 1.0);
  const double z = x * x;
  const double p = (-9.64399179425052238628E-1 * z - 9.92877231001918586564E1) * z - 1.61468768441708447952E3;
  const double q = ((z + 1.12811678491632931402E2) * z + 2.23548839060100448583E3) * z + 4.84406305325125486048E3;
  const double small = x + x * z * p / q;
  const double signed_big = x < 0.0 ? -big : big;
  return ax < 0.625 ? small : signed_big;
#endif
}

template <typename T>
RNNEXT_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// ---------------------------------------------------------------- RNN
// h = tanh(pre) or relu(pre), pre = gi + gh.
template <typename T>
RNNEXT_HOST_DEVICE T rnn_tanh_forward(T pre) {
  return tanh_(pre);
}
// d pre = dh * (1 - h^2)
template <typename T>
RNNEXT_HOST_DEVICE T rnn_tanh_backward(T dh, T h) {
  return dh * (T(1) - h * h);
}
// NaN passes through (NaN < 0 is false), as torch.relu does.
template <typename T>
RNNEXT_HOST_DEVICE T rnn_relu_forward(T pre) {
  return pre < T(0) ? T(0) : pre;
}
// d pre = dh where h > 0, as torch's threshold_backward.
template <typename T>
RNNEXT_HOST_DEVICE T rnn_relu_backward(T dh, T h) {
  return h > T(0) ? dh : T(0);
}

// ---------------------------------------------------------------- LSTM
// i = s(pre_i), f = s(pre_f), g = tanh(pre_g), o = s(pre_o)
// c = f * c_prev + i * g,  h = o * tanh(c)
template <typename T>
struct LstmActivations {
  T i, f, g, o, c, h;
};

template <typename T>
RNNEXT_HOST_DEVICE LstmActivations<T> lstm_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev) {
  LstmActivations<T> a;
  a.i = sigmoid(pre_i);
  a.f = sigmoid(pre_f);
  a.g = tanh_(pre_g);
  a.o = sigmoid(pre_o);
  a.c = a.f * c_prev + a.i * a.g;
  a.h = a.o * tanh_(a.c);
  return a;
}

// Gradients of the four pre-activations and of c_prev, from dh (gradient of h) and dc
// (gradient reaching c from the next step and from c_n).
template <typename T>
struct LstmGrads {
  T d_i, d_f, d_g, d_o, d_c_prev;
};

template <typename T>
RNNEXT_HOST_DEVICE LstmGrads<T> lstm_backward(T dh, T dc, T i, T f, T g, T o, T c, T c_prev) {
  const T tc = tanh_(c);
  const T dc_total = dc + dh * o * (T(1) - tc * tc);
  LstmGrads<T> d;
  d.d_i = dc_total * g * i * (T(1) - i);
  d.d_f = dc_total * c_prev * f * (T(1) - f);
  d.d_g = dc_total * i * (T(1) - g * g);
  d.d_o = dh * tc * o * (T(1) - o);
  d.d_c_prev = dc_total * f;
  return d;
}

// ---------------------------------------------------------------- GRU
// r = s(gi_r + gh_r), z = s(gi_z + gh_z), n = tanh(gi_n + r * gh_n)
// h = (1 - z) * n + z * h_prev; gh_n = W_hn h_prev + b_hn is saved because r multiplies it.
template <typename T>
struct GruActivations {
  T r, z, n, h;
};

template <typename T>
RNNEXT_HOST_DEVICE GruActivations<T> gru_forward(T gi_r, T gi_z, T gi_n, T gh_r, T gh_z, T gh_n,
                                                 T h_prev) {
  GruActivations<T> a;
  a.r = sigmoid(gi_r + gh_r);
  a.z = sigmoid(gi_z + gh_z);
  a.n = tanh_(gi_n + a.r * gh_n);
  a.h = (T(1) - a.z) * a.n + a.z * h_prev;
  return a;
}

// Input side and hidden side see the same r and z gradients, but the hidden part of n is
// scaled by r: d gh_n = r * d gi_n. dh_prev_direct is the z * dh path; the rest of dh_prev
// comes from d gh @ W_hh in the loop.
template <typename T>
struct GruGrads {
  T d_r, d_z, d_gi_n, d_gh_n, dh_prev_direct;
};

template <typename T>
RNNEXT_HOST_DEVICE GruGrads<T> gru_backward(T dh, T r, T z, T n, T gh_n, T h_prev) {
  GruGrads<T> d;
  const T d_n_pre = dh * (T(1) - z) * (T(1) - n * n);
  d.d_z = dh * (h_prev - n) * z * (T(1) - z);
  d.d_r = d_n_pre * gh_n * r * (T(1) - r);
  d.d_gi_n = d_n_pre;
  d.d_gh_n = d_n_pre * r;
  d.dh_prev_direct = dh * z;
  return d;
}

}  // namespace math
}  // namespace rnnext
