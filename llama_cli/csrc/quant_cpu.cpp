// x @ W.T for quantized weights (quant.py's int4 and int8 forms) and a few fp32 rows, on x86 CPUs with AVX2 or
// AVX-512: the product decoding spends its time in. Registered as the operators llama_cli::int4_gemv and
// llama_cli::int8_gemv, built on first use by native.py (torch.utils.cpp_extension), called from eager code
// and from compiled steps alike. Activations stay fp32, so the results equal the dequantized weight's
// product up to the order of the additions.
//
// int4: q (out, in/2) bytes; within each group of g columns (g a multiple of 32), byte j holds column j in
// its low nibble and column j + g/2 in its high one; w = v * scale + offset with scale, offset (out, in/g)
// fp32. So y_o = sum_groups scale_og * (sum_j x_j v_oj) + offset_og * (sum_j x_j): the offsets meet the
// per-group sums of x, computed once per row.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <type_traits>
#include <vector>

namespace {

// A vector of L floats: AVX-512 (16), AVX2 (8), or a plain float elsewhere (the compiler's own code).
#if defined(__AVX512F__)
using V = __m512;
constexpr int64_t L = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset(float s) { return _mm512_set1_ps(s); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
// L bytes -> their low and high nibbles as floats
inline void nibbles(const uint8_t* p, V& lo, V& hi) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
// L signed bytes -> floats
inline V bytes(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#elif defined(__AVX2__) && defined(__FMA__)
using V = __m256;
constexpr int64_t L = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset(float s) { return _mm256_set1_ps(s); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
inline void nibbles(const uint8_t* p, V& lo, V& hi) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
inline V bytes(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
using V = float;
constexpr int64_t L = 1;
inline V vzero() { return 0.f; }
inline V vset(float s) { return s; }
inline V vload(const float* p) { return *p; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline float vsum(V v) { return v; }
inline void nibbles(const uint8_t* p, V& lo, V& hi) { lo = float(*p & 15); hi = float(*p >> 4); }
inline V bytes(const int8_t* p) { return float(*p); }
#endif

// Runs block(R, r) over rows 0..rows-1 in blocks of 4 rows, then the rest (R a compile-time constant).
template <typename F>
void in_row_blocks(int64_t rows, F block) {
  for (int64_t r = 0; r < rows;) {
    switch (std::min<int64_t>(rows - r, 4)) {
      case 4: block(std::integral_constant<int, 4>{}, r); r += 4; break;
      case 3: block(std::integral_constant<int, 3>{}, r); r += 3; break;
      case 2: block(std::integral_constant<int, 2>{}, r); r += 2; break;
      default: block(std::integral_constant<int, 1>{}, r); r += 1; break;
    }
  }
}

// R rows of x (row stride `in`) times the weight: each weight byte is converted once for all R rows.
// Outputs are split among torch's threads (an OpenMP loop: at::parallel_for measured 1.3-1.5x slower here).
template <int R>
void rows_block(const float* x, const float* xsum, const uint8_t* q, const float* scale, const float* offset,
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

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "int4_gemv: x must be (rows, in) fp32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() && q.size(1) * 2 == x.size(1),
              "int4_gemv: q must be (out, in/2) uint8");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
              scale.is_contiguous() && offset.is_contiguous() && scale.sizes() == offset.sizes() &&
              scale.size(0) == q.size(0), "int4_gemv: scale and offset must be (out, groups) fp32");
  const int64_t rows = x.size(0), in = x.size(1), out = q.size(0), groups = scale.size(1);
  TORCH_CHECK(groups > 0 && in % groups == 0 && (in / groups) % (2 * L) == 0 && (in / groups) % 32 == 0,
              "int4_gemv: groups of a multiple of 32 columns");
  at::Tensor y = at::empty({rows, out}, x.options());
  const int64_t g = in / groups;
  std::vector<float> xsum(rows * groups);  // each row's sum over each group: what the offsets multiply
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < rows * groups; i++) {
    float t = 0.f;
    for (int64_t j = 0; j < g; j++) t += xp[i * g + j];
    xsum[i] = t;
  }
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *mp = offset.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  in_row_blocks(rows, [&](auto R, int64_t r) {
    rows_block<R()>(xp + r * in, xsum.data() + r * groups, qp, sp, mp, yp + r * out, out, in, groups);
  });
  return y;
}

// The int8 form: q (out, in) int8, w = q * scale, scale (out, in/g) fp32 (one group a row: g = in).
template <int R>
void rows_block8(const float* x, const int8_t* q, const float* scale, float* y, int64_t out, int64_t in,
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

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "int8_gemv: x must be (rows, in) fp32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.size(1) == x.size(1),
              "int8_gemv: q must be (out, in) int8");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.size(0) == q.size(0),
              "int8_gemv: scale must be (out, groups) fp32");
  const int64_t rows = x.size(0), in = x.size(1), out = q.size(0), groups = scale.size(1);
  TORCH_CHECK(groups > 0 && in % groups == 0 && (in / groups) % 32 == 0, "int8_gemv: groups of a multiple of 32 columns");
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  in_row_blocks(rows, [&](auto R, int64_t r) { rows_block8<R()>(xp + r * in, qp, sp, yp + r * out, out, in, groups); });
  return y;
}

// Dense fp32 weights (the uncompiled step's matrix-vector products: PyTorch's BLAS call streams the weight at
// about a third of the memory's speed here for one row).
template <int R>
void rows_block_dense(const float* x, const float* w, float* y, int64_t out, int64_t in) {
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

at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "dense_gemv: x must be (rows, in) fp32");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(1) == x.size(1),
              "dense_gemv: w must be (out, in) fp32");
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  in_row_blocks(rows, [&](auto R, int64_t r) { rows_block_dense<R()>(xp + r * in, wp, yp + r * out, out, in); });
  return y;
}

}  // namespace

TORCH_LIBRARY(llama_cli, m) {
  m.def("dense_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor q, Tensor scale, Tensor offset) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(llama_cli, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("dense_gemv", &dense_gemv);
}
