// x @ W.T for a few fp32 rows x and a weight W in one of quant.py's forms, on raw buffers: the products
// decoding spends its time in. Activations stay fp32, so the results equal the dequantized weight's product up
// to the order of the additions. Each output's rows are split among torch's threads (an OpenMP loop:
// at::parallel_for measured 1.3-1.5x slower here); each weight byte is converted once for up to BLOCK_ROWS rows
// (vec.h: 8 with AVX-512, 4 with AVX2).
//
// int4: q (out, in/2) bytes; within each group of g columns (g a multiple of 32), byte j holds column j in
// its low nibble and column j + g/2 in its high one; w = v * scale + offset with scale, offset (out, in/g)
// fp32. So y_o = sum_groups scale_og * (sum_j x_j v_oj) + offset_og * (sum_j x_j): the offsets meet the
// per-group sums of x, computed once per row.
// int8: q (out, in) int8, w = q * scale, scale (out, in/g) fp32 (one group a row: g = in).
// dense: w (out, in) fp32.
//
// Beyond a few rows (DENSE_KERNEL_ROWS dense, QUANT_KERNEL_ROWS quantized, measured) a matrix product that
// reuses each weight for many rows wins: the weight (dequantized first, where quantized) goes to at::mm. The
// operators take any row count, so this is the one place that decides.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <vector>

#include "vec.h"

namespace llama_cli_native {

// dense: measured 2-3x at::mm at 1-4 rows, 1.3-2x at 8 (AVX-512's 8-row blocks); from 16 rows at::mm wins for
// large weights. int4: 6.6x dequantizing + at::mm at 32 rows for a 1536x576 weight.
constexpr int64_t DENSE_KERNEL_ROWS = 8;
constexpr int64_t QUANT_KERNEL_ROWS = 32;

// y (rows, out) = x (rows, in) @ w.T through at::mm (BLAS)
inline void blas_product(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, float* y) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor yt = at::from_blob(y, {rows, out}, opts);
  at::mm_out(yt, at::from_blob(const_cast<float*>(x), {rows, in}, opts),
             at::from_blob(const_cast<float*>(w), {out, in}, opts).t());
}

// The (out, in) fp32 weight a quantized form stands for (offset null: int8)
template <typename Q>
at::Tensor dequantized(const Q* q, const float* scale, const float* offset, int64_t out, int64_t in, int64_t groups) {
  at::Tensor w = at::empty({out, in}, at::TensorOptions().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  const int64_t g = in / groups;
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t o = 0; o < out; o++) {
    for (int64_t k = 0; k < groups; k++) {
      const float s = scale[o * groups + k];
      float* wk = wp + o * in + k * g;
      if (offset == nullptr) {
        for (int64_t j = 0; j < g; j++) wk[j] = float(q[o * in + k * g + j]) * s;
      } else {
        const float m = offset[o * groups + k];
        const Q* pk = q + o * (in / 2) + k * (g / 2);
        for (int64_t j = 0; j < g / 2; j++) {
          wk[j] = float(pk[j] & 15) * s + m;
          wk[j + g / 2] = float(pk[j] >> 4) * s + m;
        }
      }
    }
  }
  return w;
}

template <int R>
void int4_block(const float* x, const float* xsum, const uint8_t* q, const float* scale, const float* offset,
                float* y, int64_t out, int64_t in, int64_t groups) {
  const int64_t half = in / groups / 2;
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t o = 0; o < out; o++) {
    const uint8_t* qo = q + o * (in / 2);
    const float* so = scale + o * groups;
    const float* mo = offset + o * groups;
    V acc[R];
    for (int r = 0; r < R; r++) acc[r] = vzero();
    for (int64_t k = 0; k < groups; k++) {
      const uint8_t* pk = qo + k * half;
      const float* xk = x + k * 2 * half;
      V t[R];
      for (int r = 0; r < R; r++) t[r] = vzero();
      for (int64_t c = 0; c < half; c += L) {
        V lo, hi;
        nibbles(pk + c, lo, hi);
        for (int r = 0; r < R; r++) {
          t[r] = vfma(lo, vload(xk + r * in + c), t[r]);
          t[r] = vfma(hi, vload(xk + r * in + half + c), t[r]);
        }
      }
      const V s = vset(so[k]);
      for (int r = 0; r < R; r++) acc[r] = vfma(t[r], s, acc[r]);
    }
    // the offsets' part, sum_k offset_k * xsum_k: L groups at a time (one long chain of scalar additions
    // here measured as slow as the whole product above)
    int64_t k = 0;
    for (; k + L <= groups; k += L) {
      const V m = vload(mo + k);
      for (int r = 0; r < R; r++) acc[r] = vfma(m, vload(xsum + r * groups + k), acc[r]);
    }
    for (int r = 0; r < R; r++) {
      float v = vsum(acc[r]);
      for (int64_t j = k; j < groups; j++) v += mo[j] * xsum[r * groups + j];
      y[r * out + o] = v;
    }
  }
}

inline void int4_product(const float* x, int64_t rows, int64_t in, const uint8_t* q, const float* scale,
                         const float* offset, int64_t out, int64_t groups, float* y) {
  if (rows > QUANT_KERNEL_ROWS) {
    at::Tensor w = dequantized(q, scale, offset, out, in, groups);
    return blas_product(x, rows, in, w.data_ptr<float>(), out, y);
  }
  const int64_t g = in / groups;
  std::vector<float> xsum(rows * groups);  // each row's sum over each group: what the offsets multiply
  for (int64_t i = 0; i < rows * groups; i++) {
    float t = 0.f;
    for (int64_t j = 0; j < g; j++) t += x[i * g + j];
    xsum[i] = t;
  }
  in_row_blocks(rows, [&](auto R, int64_t r) {
    int4_block<R()>(x + r * in, xsum.data() + r * groups, q, scale, offset, y + r * out, out, in, groups);
  });
}

template <int R>
void int8_block(const float* x, const int8_t* q, const float* scale, float* y, int64_t out, int64_t in,
                int64_t groups) {
  const int64_t g = in / groups;
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t o = 0; o < out; o++) {
    const int8_t* qo = q + o * in;
    const float* so = scale + o * groups;
    V acc[R];
    for (int r = 0; r < R; r++) acc[r] = vzero();
    for (int64_t k = 0; k < groups; k++) {
      V t[R];
      for (int r = 0; r < R; r++) t[r] = vzero();
      for (int64_t c = k * g; c < (k + 1) * g; c += L) {
        const V w = bytes(qo + c);
        for (int r = 0; r < R; r++) t[r] = vfma(w, vload(x + r * in + c), t[r]);
      }
      const V s = vset(so[k]);
      for (int r = 0; r < R; r++) acc[r] = vfma(t[r], s, acc[r]);
    }
    for (int r = 0; r < R; r++) y[r * out + o] = vsum(acc[r]);
  }
}

inline void int8_product(const float* x, int64_t rows, int64_t in, const int8_t* q, const float* scale,
                         int64_t out, int64_t groups, float* y) {
  if (rows > QUANT_KERNEL_ROWS) {
    at::Tensor w = dequantized(q, scale, static_cast<const float*>(nullptr), out, in, groups);
    return blas_product(x, rows, in, w.data_ptr<float>(), out, y);
  }
  in_row_blocks(rows, [&](auto R, int64_t r) { int8_block<R()>(x + r * in, q, scale, y + r * out, out, in, groups); });
}

// Dense fp32 weights (uncompiled steps: PyTorch's BLAS call streams the weight at about a third of the memory's
// speed here for one row).
template <int R>
void dense_block(const float* x, const float* w, float* y, int64_t out, int64_t in) {
  const int threads = at::get_num_threads();
  const int64_t body = in - in % L;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t o = 0; o < out; o++) {
    const float* wo = w + o * in;
    V acc[R];
    for (int r = 0; r < R; r++) acc[r] = vzero();
    for (int64_t c = 0; c < body; c += L) {
      const V wv = vload(wo + c);
      for (int r = 0; r < R; r++) acc[r] = vfma(wv, vload(x + r * in + c), acc[r]);
    }
    for (int r = 0; r < R; r++) {
      float v = vsum(acc[r]);
      for (int64_t c = body; c < in; c++) v += wo[c] * x[r * in + c];
      y[r * out + o] = v;
    }
  }
}

inline void dense_product(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, float* y) {
  if (rows > DENSE_KERNEL_ROWS) return blas_product(x, rows, in, w, out, y);
  in_row_blocks(rows, [&](auto R, int64_t r) { dense_block<R()>(x + r * in, w, y + r * out, out, in); });
}

// A linear layer's weight in one of quant.py's forms, told apart by its parts: [w] dense fp32, [q, scale] int8,
// [q, scale, offset] int4.
struct Weight {
  at::TensorList parts;
  int64_t out, in;

  // who: the operator, for its messages; name: which weight
  Weight(at::TensorList p, const char* who, const char* name) : parts(p) {
    TORCH_CHECK(p.size() >= 1 && p.size() <= 3, who, ": ", name, " must be [w], [q, scale] or [q, scale, offset]");
    for (const auto& t : p) TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(),
                                        who, ": ", name, "'s parts must be contiguous 2-D CPU tensors");
    out = p[0].size(0);
    if (p.size() == 1) {
      TORCH_CHECK(p[0].scalar_type() == at::kFloat, who, ": dense ", name, " must be fp32");
      in = p[0].size(1);
      return;
    }
    const bool int4 = p.size() == 3;
    TORCH_CHECK(p[0].scalar_type() == (int4 ? at::kByte : at::kChar), who, ": ", name, "'s integers must be ",
                int4 ? "uint8 (int4)" : "int8");
    in = int4 ? p[0].size(1) * 2 : p[0].size(1);
    for (size_t i = 1; i < p.size(); i++)
      TORCH_CHECK(p[i].scalar_type() == at::kFloat && p[i].size(0) == out && p[i].sizes() == p[1].sizes(),
                  who, ": ", name, "'s tables must be (out, groups) fp32");
    const int64_t groups = p[1].size(1);
    TORCH_CHECK(groups > 0 && in % groups == 0 && (in / groups) % 32 == 0,
                who, ": ", name, " needs groups of a multiple of 32 columns");
  }

  // y (rows, out) = x (rows, in) @ W.T
  void apply(const float* x, int64_t rows, float* y) const {
    if (parts.size() == 1) {
      dense_product(x, rows, in, parts[0].data_ptr<float>(), out, y);
    } else if (parts.size() == 2) {
      int8_product(x, rows, in, parts[0].data_ptr<int8_t>(), parts[1].data_ptr<float>(), out, parts[1].size(1), y);
    } else {
      int4_product(x, rows, in, parts[0].data_ptr<uint8_t>(), parts[1].data_ptr<float>(), parts[2].data_ptr<float>(),
                   out, parts[1].size(1), y);
    }
  }
};

}  // namespace llama_cli_native
