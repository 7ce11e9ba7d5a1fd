// A vector of L floats for the CPU kernels: AVX-512 (16), AVX2 (8), or a plain float elsewhere (the compiler's
// own code), chosen when the library is built for this machine (-march=native).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace llama_cli_native {

// Half-width weights as stored (Meta's bf16, older fp16 checkpoints), read as fp32: both conversions are exact.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

// fp32 -> a KV cache's type, rounded to nearest even (c10's conversions, as torch's .to() rounds)
template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline bf16_t from_float<bf16_t>(float f) { return bf16_t{c10::BFloat16(f).x}; }
template <>
inline f16_t from_float<f16_t>(float f) { return f16_t{c10::Half(f).x}; }

inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) {  // bf16 is fp32's upper half
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(f16_t v) {  // IEEE half -> float, subnormals, infinities and NaNs included
  const uint32_t sign = uint32_t(v.bits & 0x8000) << 16, exp = (v.bits >> 10) & 0x1f;
  uint32_t mant = v.bits & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000 | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: shift the mantissa up to an implicit leading one
    uint32_t e = 113;
    while (!(mant & 0x400)) {
      mant <<= 1;
      e--;
    }
    u = sign | (e << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX512F__)
using V = __m512;
constexpr int64_t L = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset(float s) { return _mm512_set1_ps(s); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vload(const bf16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline V vload(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline float vhmax(V v) { return _mm512_reduce_max_ps(v); }
inline V vround(V v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V vpow2(V p, V n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral
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
inline V vload(const bf16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
#if defined(__F16C__)
inline V vload(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#else
inline V vload(const f16_t* p) {
  alignas(32) float f[8];
  for (int i = 0; i < 8; i++) f[i] = to_float(p[i]);
  return _mm256_load_ps(f);
}
#endif
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline float vhmax(V v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline V vround(V v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V vpow2(V p, V n) {  // p * 2^n, n integral in -126..127: n added to the exponent bits of 1.0
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
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
inline V vload(const bf16_t* p) { return to_float(*p); }
inline V vload(const f16_t* p) { return to_float(*p); }
inline void vstore(float* p, V v) { *p = v; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline V vmul(V a, V b) { return a * b; }
inline V vadd(V a, V b) { return a + b; }
inline float vsum(V v) { return v; }
inline V vmax(V a, V b) { return std::max(a, b); }
inline float vhmax(V v) { return v; }
inline V vround(V v) { return std::nearbyint(v); }
inline V vpow2(V p, V n) { return std::ldexp(p, int(n)); }
inline void nibbles(const uint8_t* p, V& lo, V& hi) { lo = float(*p & 15); hi = float(*p >> 4); }
inline V bytes(const int8_t* p) { return float(*p); }
#endif

// exp(x) of L floats x <= 0 (softmax's exponents): exp(x) = 2^n exp(r), n = round(x log2 e), r = x - n ln 2 in
// [-ln2/2, ln2/2] (ln 2 in two parts), exp(r) by Cephes' expf polynomial (within 1.3 ulp of exp over [-87, 0],
// all three builds, checked by a /tmp program against double precision); x below -87
// (where exp underflows to subnormals) gives ~exp(-87) ~ 1.6e-38, as good as 0 beside the largest term's 1.
inline V vexp(V x) {
  x = vmax(x, vset(-87.f));
  const V n = vround(vmul(x, vset(1.44269504088896341f)));
  V r = vfma(n, vset(-0.693359375f), x);
  r = vfma(n, vset(2.12194440e-4f), r);
  V p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.f)));
  return vpow2(p, n);
}

// sum_i a_i b_i over n values (vectors, then the tail); b in fp32, bf16 or fp16 (a KV cache's type)
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  V acc = vzero();
  int64_t i = 0;
  for (; i + L <= n; i += L) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = vsum(acc);
  for (; i < n; i++) s += a[i] * to_float(b[i]);
  return s;
}

// y_i += a * x_i over n values; x in fp32, bf16 or fp16
template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
  const V av = vset(a);
  int64_t i = 0;
  for (; i + L <= n; i += L) vstore(y + i, vfma(av, vload(x + i), vload(y + i)));
  for (; i < n; i++) y[i] += a * to_float(x[i]);
}

// The most rows a kernel multiplies per pass over a weight: their accumulators must stay in registers
// (AVX-512 has 32 vector registers, AVX2 16).
constexpr int64_t BLOCK_ROWS = L == 16 ? 8 : 4;

// Runs block(R, r) over rows 0..rows-1 in blocks of BLOCK_ROWS rows, then the rest (R a compile-time constant).
template <int64_t MaxR = BLOCK_ROWS, typename F>
void in_row_blocks(int64_t rows, F block) {
  for (int64_t r = 0; r < rows;) {
    switch (std::min<int64_t>(rows - r, MaxR)) {
      case 8: block(std::integral_constant<int, 8>{}, r); r += 8; break;
      case 7: block(std::integral_constant<int, 7>{}, r); r += 7; break;
      case 6: block(std::integral_constant<int, 6>{}, r); r += 6; break;
      case 5: block(std::integral_constant<int, 5>{}, r); r += 5; break;
      case 4: block(std::integral_constant<int, 4>{}, r); r += 4; break;
      case 3: block(std::integral_constant<int, 3>{}, r); r += 3; break;
      case 2: block(std::integral_constant<int, 2>{}, r); r += 2; break;
      default: block(std::integral_constant<int, 1>{}, r); r += 1; break;
    }
  }
}

}  // namespace llama_cli_native
