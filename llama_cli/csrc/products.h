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
// dense: w (out, in) fp32, bf16 or fp16.
//
// Beyond a few rows (DENSE_KERNEL_ROWS fp32, HALF_KERNEL_ROWS bf16/fp16, NARROW_KERNEL_ROWS either for narrow
// weights, QUANT_KERNEL_ROWS quantized, measured) a matrix product that reuses each weight for many rows wins: the
// weight (widened or dequantized first, a block of its rows at a time, where it is not fp32) goes to at::mm. The
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
// bf16/fp16 weights: the kernel reads half the bytes, BLAS needs them widened first. Measured (two builds
// alternating): at 12 rows the kernel wins for every weight tried (4096 x 4096 6.8-7.5 ms against 7.5-8.5;
// SmolLM2's 1536 x 576 0.13 against 0.36); at 16 rows only for SmolLM2's (49152 x 576 output: 10 against 12),
// widening for the 7B-sized ones (4096 x 4096 6.1 against 9.2).
constexpr int64_t HALF_KERNEL_ROWS = 12;
// Narrow weights (at most NARROW_IN columns, as SmolLM2's but its w2): the kernel up to 16 rows, dense fp32 or
// half-width alike. Measured end to end (scripts/bench_batching.py --prompts 32, two builds alternating, 16-row
// steps): SmolLM2 bf16 continuous 167-170 tok/s against 124, fp32 135-147 against 124-126, the dim-512 bench
// model 762-840 against 726-728.
constexpr int64_t NARROW_IN = 1024;
constexpr int64_t NARROW_KERNEL_ROWS = 16;
constexpr int64_t QUANT_KERNEL_ROWS = 32;

// Up to this many rows, for weights of at least TRANSPOSED_MIN_WEIGHT elements, BLAS computes y.T = W @ x.T (then
// transposed into y) rather than x @ W.T, with x's rows padded with zeros to a multiple of 8: MKL's W @ x.T is slow
// for row counts just under a multiple of 8 or 16 (4096 x 4096 at 30 rows: 13.1 ms, padded to 32 8.8, x @ W.T 12.5).
// Measured (/tmp script, 2-core AVX-512 VM, rows 17-128): padded W @ x.T 1.1-1.6x faster than x @ W.T for weights of
// 16 MB and more (2048 x 2048 up to 12288 x 4096, tall output layers 32000 x 512 and 49152 x 576); for weights of
// up to ~7 MB (SmolLM2's and the bench model's layers) x @ W.T is as fast or up to 1.4x faster (1024 x 512 at 22
// rows: 0.20 ms against 0.26); past ~192 rows the two trade places by shape.
constexpr int64_t TRANSPOSED_MAX_ROWS = 128;
constexpr int64_t TRANSPOSED_MIN_WEIGHT = int64_t{1} << 21;  // elements: 8 MB of fp32

// y (rows, out) = x (rows, in) @ w.T through at::mm (BLAS); y_stride: the distance between y's rows where w is a
// block of a larger weight's rows and y the matching block of columns of its output
inline void blas_product(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, float* y,
                         int64_t y_stride = -1) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor yt = at::from_blob(y, {rows, out}, {y_stride < 0 ? out : y_stride, 1}, opts);
  at::Tensor xt = at::from_blob(const_cast<float*>(x), {rows, in}, opts);
  at::Tensor wt = at::from_blob(const_cast<float*>(w), {out, in}, opts);
  if (rows <= TRANSPOSED_MAX_ROWS && out * in >= TRANSPOSED_MIN_WEIGHT) {
    const int64_t padded = (rows + 7) / 8 * 8;
    if (padded != rows) {
      at::Tensor xp = xt.new_zeros({padded, in});
      xp.narrow(0, 0, rows).copy_(xt);
      xt = xp;
    }
    yt.copy_(at::mm(wt, xt.t()).narrow(1, 0, rows).t());
  } else {
    at::mm_out(yt, xt, wt.t());  // rows of stride y_stride: BLAS writes them in place
  }
}

// y = x @ W.T through at::mm for a weight stored in another form: fill(o0, n, dst) writes W's rows o0..o0+n-1 as
// fp32 into dst, a block of rows at a time, into one scratch buffer kept per thread (16 MB: measured 5-10% faster
// than 4 MB at 400 rows). A whole fp32 copy of the weight allocated per call cost more in page faults than the
// conversion (4096 x 4096 bf16: 23 ms against 8 for the product of 17 rows).
template <typename Fill>
void converted_product(const float* x, int64_t rows, int64_t in, int64_t out, float* y, Fill fill) {
  const int64_t block = std::max<int64_t>(16, std::min(out, (int64_t(1) << 22) / in));
  thread_local std::vector<float> scratch;
  if (int64_t(scratch.size()) < block * in) scratch.resize(block * in);
  for (int64_t o0 = 0; o0 < out; o0 += block) {
    const int64_t n = std::min(block, out - o0);
    fill(o0, n, scratch.data());
    blas_product(x, rows, in, scratch.data(), n, y + o0, out);
  }
}

// Rows o0..o0+n-1 of the (out, in) fp32 weight a quantized form stands for (offset null: int8), into dst, L weights
// at a time (a group's columns are a multiple of 32): q * scale (+ offset), within a rounding of quant.dequantize's
// values (the compiler may fuse the multiply-add)
template <typename Q>
void dequantize_rows(const Q* q, const float* scale, const float* offset, int64_t in, int64_t groups, int64_t o0,
                     int64_t n, float* dst) {
  const int64_t g = in / groups;
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; i++) {
    const int64_t o = o0 + i;
    for (int64_t k = 0; k < groups; k++) {
      const V s = vset(scale[o * groups + k]);
      float* wk = dst + i * in + k * g;
      if (offset == nullptr) {
        const int8_t* qk = reinterpret_cast<const int8_t*>(q) + o * in + k * g;
        for (int64_t j = 0; j < g; j += L) vstore(wk + j, vmul(bytes(qk + j), s));
      } else {
        const V m = vset(offset[o * groups + k]);
        const uint8_t* pk = reinterpret_cast<const uint8_t*>(q) + o * (in / 2) + k * (g / 2);
        for (int64_t j = 0; j < g / 2; j += L) {
          V lo, hi;
          nibbles(pk + j, lo, hi);
          vstore(wk + j, vadd(vmul(lo, s), m));
          vstore(wk + j + g / 2, vadd(vmul(hi, s), m));
        }
      }
    }
  }
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
    return converted_product(x, rows, in, out, y, [&](int64_t o0, int64_t n, float* dst) {
      dequantize_rows(q, scale, offset, in, groups, o0, n, dst);
    });
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
    return converted_product(x, rows, in, out, y, [&](int64_t o0, int64_t n, float* dst) {
      dequantize_rows(q, scale, static_cast<const float*>(nullptr), in, groups, o0, n, dst);
    });
  }
  in_row_blocks(rows, [&](auto R, int64_t r) { int8_block<R()>(x + r * in, q, scale, y + r * out, out, in, groups); });
}

// Dense weights, fp32 or half-width as stored (bf16, fp16; each converted to fp32 as it is read, exactly) for
// uncompiled steps: PyTorch's BLAS call streams an fp32 weight at about a third of the memory's speed here for
// one row, and has no product of fp32 rows with a half-width weight at all.
template <int R, typename T>
void dense_block(const float* x, const T* w, float* y, int64_t out, int64_t in) {
  const int threads = at::get_num_threads();
  const int64_t body = in - in % L;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t o = 0; o < out; o++) {
    const T* wo = w + o * in;
    V acc[R];
    for (int r = 0; r < R; r++) acc[r] = vzero();
    for (int64_t c = 0; c < body; c += L) {
      const V wv = vload(wo + c);
      for (int r = 0; r < R; r++) acc[r] = vfma(wv, vload(x + r * in + c), acc[r]);
    }
    for (int r = 0; r < R; r++) {
      float v = vsum(acc[r]);
      for (int64_t c = body; c < in; c++) v += to_float(wo[c]) * x[r * in + c];
      y[r * out + o] = v;
    }
  }
}

template <typename T>
void dense_product(const float* x, int64_t rows, int64_t in, const T* w, int64_t out, float* y) {
  // a half-width weight costs the kernel half the bytes, and at::mm a widening first: the kernel up to 12 rows
  // (16 for narrow weights, as fp32's)
  const int64_t kernel_rows =
      in <= NARROW_IN ? NARROW_KERNEL_ROWS : std::is_same_v<T, float> ? DENSE_KERNEL_ROWS : HALF_KERNEL_ROWS;
  if (rows > kernel_rows) {
    if constexpr (std::is_same_v<T, float>) {
      return blas_product(x, rows, in, w, out, y);
    } else {
      return converted_product(x, rows, in, out, y, [&](int64_t o0, int64_t n, float* dst) {
        const T* src = w + o0 * in;
        const int64_t count = n * in, body = count - count % L;
        const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < body; i += L) vstore(dst + i, vload(src + i));
        for (int64_t i = body; i < count; i++) dst[i] = to_float(src[i]);
      });
    }
  }
  in_row_blocks(rows, [&](auto R, int64_t r) { dense_block<R()>(x + r * in, w, y + r * out, out, in); });
}

// A linear layer's weight in one of quant.py's forms, told apart by its parts: [w] dense (fp32, bf16 or fp16),
// [q, scale] int8, [q, scale, offset] int4.
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
      const auto t = p[0].scalar_type();
      TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, who, ": dense ", name,
                  " must be fp32, bf16 or fp16");
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
      switch (parts[0].scalar_type()) {
        case at::kBFloat16: return dense_product(x, rows, in, static_cast<const bf16_t*>(parts[0].data_ptr()), out, y);
        case at::kHalf: return dense_product(x, rows, in, static_cast<const f16_t*>(parts[0].data_ptr()), out, y);
        default: return dense_product(x, rows, in, parts[0].data_ptr<float>(), out, y);
      }
    } else if (parts.size() == 2) {
      int8_product(x, rows, in, parts[0].data_ptr<int8_t>(), parts[1].data_ptr<float>(), out, parts[1].size(1), y);
    } else {
      int4_product(x, rows, in, parts[0].data_ptr<uint8_t>(), parts[1].data_ptr<float>(), parts[2].data_ptr<float>(),
                   out, parts[1].size(1), y);
    }
  }
};

}  // namespace llama_cli_native
