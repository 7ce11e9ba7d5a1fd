// One transformer layer of a decode step on the CPU, for a few rows each at its own position: what model.py's
// TransformerBlock computes for one new token per row (fp32 activations; the KV cache in fp32, or in bf16/fp16
// with --kv_cache_dtype: rounded as written, widened as read), in one call instead of ~20 operator
// calls (eager) or one compiled graph plus dynamo's checks (compiled), which for a small model cost more than
// the products themselves. Row b writes its key and value at positions[b] of cache row b and attends over
// cache positions 0..positions[b] of that row, so the work follows each row's own length. Split in its
// attention and feed-forward halves for model parallelism (the caller all-reduces each half's output).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "products.h"
#include "vec.h"

namespace llama_cli_native {

// Meta's RMSNorm: x / sqrt(mean(x^2) + eps), then times the weight
inline void rms_norm(const float* x, const float* w, float eps, int64_t n, float* y) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / float(n) + eps);
  for (int64_t i = 0; i < n; i++) y[i] = (x[i] * r) * w[i];
}

// Rotate interleaved pairs (x[2i], x[2i+1]) of each of `heads` heads by the angles in cos/sin (head_dim/2 each)
inline void rotate(float* x, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  for (int64_t h = 0; h < heads; h++) {
    float* v = x + h * hd;
    for (int64_t i = 0; i < hd / 2; i++) {
      const float x0 = v[2 * i], x1 = v[2 * i + 1];
      v[2 * i] = x0 * cos[i] - x1 * sin[i];
      v[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
    }
  }
}

// w[0..n) <- exp(w - top) where top = max w, total = their sum (vectors of L, then the tail; exp as vexp's)
inline void softmax_part(float* w, int64_t n, float& top, float& total) {
  const int64_t body = n - n % L;
  float m = -std::numeric_limits<float>::infinity();
  if (body) {
    V mv = vload(w);
    for (int64_t t = L; t < body; t += L) mv = vmax(mv, vload(w + t));
    m = vhmax(mv);
  }
  for (int64_t t = body; t < n; t++) m = std::max(m, w[t]);
  const V minus_m = vset(-m);
  V sv = vzero();
  for (int64_t t = 0; t < body; t += L) {
    const V e = vexp(vadd(vload(w + t), minus_m));
    vstore(w + t, e);
    sv = vadd(sv, e);
  }
  float sum = vsum(sv);
  for (int64_t t = body; t < n; t++) {
    w[t] = std::exp(w[t] - m);
    sum += w[t];
  }
  top = m;
  total = sum;
}

// o (rep, hd) <- sum over t < n of w[r * stride + t] values[t] for each of the rep query heads: each value vector
// read once for all of them, the sums kept in registers for L of the hd columns at a time (up to 8 heads; beyond,
// one head at a time)
template <typename T>
inline void weigh_values(const float* w, int64_t stride, const T* values, int64_t n, int64_t rep, int64_t hd,
                         float* o) {
  constexpr int64_t MAX_REP = 8;
  if (rep > MAX_REP || hd % L) {
    std::fill_n(o, rep * hd, 0.f);
    for (int64_t t = 0; t < n; t++)
      for (int64_t r = 0; r < rep; r++) axpy(w[r * stride + t], values + t * hd, o + r * hd, hd);
    return;
  }
  for (int64_t c = 0; c < hd; c += L) {
    V acc[MAX_REP];
    for (int64_t r = 0; r < rep; r++) acc[r] = vzero();
    for (int64_t t = 0; t < n; t++) {
      const V v = vload(values + t * hd + c);
      for (int64_t r = 0; r < rep; r++) acc[r] = vfma(vset(w[r * stride + t]), v, acc[r]);
    }
    for (int64_t r = 0; r < rep; r++) vstore(o + r * hd + c, acc[r]);
  }
}

// Attention of one new token per row: query head j of row b (q: (B, hq, hd)) over cache positions
// 0..pos[b] of row b, key/value head j / rep (rep = hq / hkv), into out (B, hq, hd). Work is split in tasks of
// one row, one key/value head and a span of at most SPAN positions: a task reads its keys and values once for
// all rep query heads that share them (grouped-query attention reads each cache entry once, not rep times:
// the step is bound by reading the cache at long lengths), and long rows split over threads; the spans'
// partial softmax sums then merge per head (as flash-decoding does).
template <typename T>
inline void attend(const float* q, const T* ck, const T* cv, const int64_t* pos, int64_t B, int64_t hq,
                   int64_t hkv, int64_t S, int64_t hd, float* out) {
  constexpr int64_t SPAN = 256;
  const int64_t rep = hq / hkv;
  const float scale = 1.f / std::sqrt(float(hd));
  std::vector<int64_t> task_row, task_head, task_from, first;  // first[b * hkv + h]: its first task
  int64_t work = 0;
  for (int64_t b = 0; b < B; b++) {
    for (int64_t h = 0; h < hkv; h++) {
      first.push_back(int64_t(task_row.size()));
      for (int64_t t = 0; t <= pos[b]; t += SPAN) {
        task_row.push_back(b);
        task_head.push_back(h);
        task_from.push_back(t);
      }
    }
    work += hq * (pos[b] + 1) * hd;
  }
  first.push_back(int64_t(task_row.size()));
  const int64_t tasks = int64_t(task_row.size());
  // per task and query head: the span's largest score, its sum of exp(score - largest), and the
  // exp-weighted sum of its values
  std::vector<float> top(tasks * rep), total(tasks * rep), part(tasks * rep * hd);
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (work >= (1 << 16))
  for (int64_t i = 0; i < tasks; i++) {
    const int64_t b = task_row[i], h = task_head[i], from = task_from[i];
    const int64_t n = std::min(pos[b] + 1 - from, SPAN);
    const T* keys = ck + ((b * hkv + h) * S + from) * hd;
    const T* values = cv + ((b * hkv + h) * S + from) * hd;
    const float* qs = q + (b * hq + h * rep) * hd;  // the rep query heads of this key/value head
    float w[SPAN * 8];
    std::vector<float> wide_w;  // more than 8 query heads per key/value head: on the heap
    float* ws = w;
    if (rep > 8) {
      wide_w.resize(rep * SPAN);
      ws = wide_w.data();
    }
    for (int64_t t = 0; t < n; t++)
      for (int64_t r = 0; r < rep; r++) ws[r * SPAN + t] = dot(qs + r * hd, keys + t * hd, hd) * scale;
    for (int64_t r = 0; r < rep; r++) {
      softmax_part(ws + r * SPAN, n, top[i * rep + r], total[i * rep + r]);
    }
    weigh_values(ws, SPAN, values, n, rep, hd, part.data() + i * rep * hd);
  }
  // merge each head's spans: out = sum_i exp(top_i - m) part_i / sum_i exp(top_i - m) total_i
  for (int64_t b = 0; b < B; b++) {
    for (int64_t h = 0; h < hkv; h++) {
      const int64_t i0 = first[b * hkv + h], i1 = first[b * hkv + h + 1];
      for (int64_t r = 0; r < rep; r++) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = i0; i < i1; i++) m = std::max(m, top[i * rep + r]);
        float* o = out + (b * hq + h * rep + r) * hd;
        std::fill_n(o, hd, 0.f);
        float sum = 0.f;
        for (int64_t i = i0; i < i1; i++) {
          const float f = std::exp(top[i * rep + r] - m);
          sum += f * total[i * rep + r];
          axpy(f, part.data() + (i * rep + r) * hd, o, hd);
        }
        const float inv = 1.f / sum;
        for (int64_t d = 0; d < hd; d++) o[d] *= inv;
      }
    }
  }
}

// Row b's new key and value (k, v: (B, hkv, hd) fp32) into position pos[b] of cache row b, in the cache's type
// (rounded to nearest even, as torch's conversions round)
template <typename T>
inline void write_cache(const float* k, const float* v, T* ck, T* cv, const int64_t* pos, int64_t B, int64_t hkv,
                        int64_t S, int64_t hd) {
  for (int64_t b = 0; b < B; b++) {
    for (int64_t h = 0; h < hkv; h++) {
      const int64_t at = ((b * hkv + h) * S + pos[b]) * hd, from = (b * hkv + h) * hd;
      for (int64_t d = 0; d < hd; d++) {
        ck[at + d] = from_float<T>(k[from + d]);
        cv[at + d] = from_float<T>(v[from + d]);
      }
    }
  }
}

// The attention half of a layer, without its residual: attention(norm(x)) @ wo.T, (rows, dim). With model
// parallelism (one process per slice of the heads) the caller all-reduces it before adding it to x.
inline at::Tensor decode_attention(const at::Tensor& x, at::TensorList wq_, at::TensorList wk_, at::TensorList wv_,
                                   at::TensorList wo_, const at::Tensor& attention_norm, double eps,
                                   const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& positions,
                                   const at::Tensor& rope_cos, const at::Tensor& rope_sin) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "decode_layer: x must be (rows, dim) fp32");
  const int64_t B = x.size(0), dim = x.size(1);
  const auto kind = cache_k.scalar_type();
  TORCH_CHECK(cache_k.dim() == 4 && (kind == at::kFloat || kind == at::kBFloat16 || kind == at::kHalf) &&
              cache_k.is_contiguous() && cache_v.sizes() == cache_k.sizes() && cache_v.scalar_type() == kind &&
              cache_v.is_contiguous(), "decode_layer: the caches must be (batch, kv_heads, length, head_dim) fp32, "
              "bf16 or fp16");
  const int64_t hkv = cache_k.size(1), S = cache_k.size(2), hd = cache_k.size(3);
  TORCH_CHECK(B <= cache_k.size(0), "decode_layer: more rows than the cache has");
  const Weight wq(wq_, "decode_layer", "wq"), wk(wk_, "decode_layer", "wk"), wv(wv_, "decode_layer", "wv"),
      wo(wo_, "decode_layer", "wo");
  const int64_t hq = wq.out / hd;
  TORCH_CHECK(wq.in == dim && wk.in == dim && wv.in == dim && wq.out % hd == 0 && wk.out == hkv * hd &&
              wv.out == hkv * hd && hq % hkv == 0 && wo.in == hq * hd && wo.out == dim,
              "decode_layer: the weights' shapes do not fit the model's");
  TORCH_CHECK(attention_norm.numel() == dim && attention_norm.scalar_type() == at::kFloat &&
              attention_norm.is_contiguous(), "decode_layer: the norms' weights must be (dim,) fp32");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == B && positions.scalar_type() == at::kLong,
              "decode_layer: positions must be (rows,) int64");
  TORCH_CHECK(rope_cos.dim() == 2 && rope_cos.size(1) * 2 == hd && rope_sin.sizes() == rope_cos.sizes() &&
              rope_cos.scalar_type() == at::kFloat && rope_sin.scalar_type() == at::kFloat &&
              rope_cos.is_contiguous() && rope_sin.is_contiguous(), "decode_layer: rope tables must be (length, head_dim/2) fp32");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++)
    TORCH_CHECK(pos[b] >= 0 && pos[b] < S && pos[b] < rope_cos.size(0), "decode_layer: a position is outside the cache");
  const float* xp = x.data_ptr<float>();
  std::vector<float> xn(B * dim), q(B * hq * hd), k(B * hkv * hd), v(B * hkv * hd), attn(B * hq * hd);

  // norm, q/k/v, rotary, the cache writes
  for (int64_t b = 0; b < B; b++)
    rms_norm(xp + b * dim, attention_norm.data_ptr<float>(), float(eps), dim, xn.data() + b * dim);
  wq.apply(xn.data(), B, q.data());
  wk.apply(xn.data(), B, k.data());
  wv.apply(xn.data(), B, v.data());
  for (int64_t b = 0; b < B; b++) {
    const float* c = rope_cos.data_ptr<float>() + pos[b] * (hd / 2);
    const float* s = rope_sin.data_ptr<float>() + pos[b] * (hd / 2);
    rotate(q.data() + b * hq * hd, hq, hd, c, s);
    rotate(k.data() + b * hkv * hd, hkv, hd, c, s);
  }
  auto write_and_attend = [&](auto* ck, auto* cv) {  // in the cache's element type
    write_cache(k.data(), v.data(), ck, cv, pos, B, hkv, S, hd);
    attend(q.data(), ck, cv, pos, B, hq, hkv, S, hd, attn.data());
  };
  if (kind == at::kFloat)
    write_and_attend(cache_k.data_ptr<float>(), cache_v.data_ptr<float>());
  else if (kind == at::kBFloat16)
    write_and_attend(reinterpret_cast<bf16_t*>(cache_k.data_ptr()), reinterpret_cast<bf16_t*>(cache_v.data_ptr()));
  else
    write_and_attend(reinterpret_cast<f16_t*>(cache_k.data_ptr()), reinterpret_cast<f16_t*>(cache_v.data_ptr()));
  at::Tensor out = at::empty({B, dim}, x.options());
  wo.apply(attn.data(), B, out.data_ptr<float>());
  return out;
}

// The feed-forward half, without its residual: w2(silu(w1 hn) * w3 hn) with hn = norm(h), (rows, dim).
inline at::Tensor decode_feed_forward(const at::Tensor& h, at::TensorList w1_, at::TensorList w3_, at::TensorList w2_,
                                      const at::Tensor& ffn_norm, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous(),
              "decode_layer: h must be (rows, dim) fp32");
  const int64_t B = h.size(0), dim = h.size(1);
  const Weight w1(w1_, "decode_layer", "w1"), w3(w3_, "decode_layer", "w3"), w2(w2_, "decode_layer", "w2");
  const int64_t hidden = w1.out;
  TORCH_CHECK(w1.in == dim && w3.in == dim && w3.out == hidden && w2.in == hidden && w2.out == dim,
              "decode_layer: the weights' shapes do not fit the model's");
  TORCH_CHECK(ffn_norm.numel() == dim && ffn_norm.scalar_type() == at::kFloat && ffn_norm.is_contiguous(),
              "decode_layer: the norms' weights must be (dim,) fp32");
  std::vector<float> hn(B * dim), gate(B * hidden), up(B * hidden);
  const float* hp = h.data_ptr<float>();
  for (int64_t b = 0; b < B; b++)
    rms_norm(hp + b * dim, ffn_norm.data_ptr<float>(), float(eps), dim, hn.data() + b * dim);
  w1.apply(hn.data(), B, gate.data());
  w3.apply(hn.data(), B, up.data());
  for (int64_t i = 0; i < B * hidden; i++) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  at::Tensor out = at::empty({B, dim}, h.options());
  w2.apply(gate.data(), B, out.data_ptr<float>());
  return out;
}

// A whole layer in one process: h = x + attention; h + feed-forward.
inline at::Tensor decode_layer(const at::Tensor& x, at::TensorList wq, at::TensorList wk, at::TensorList wv,
                               at::TensorList wo, at::TensorList w1, at::TensorList w3, at::TensorList w2,
                               const at::Tensor& attention_norm, const at::Tensor& ffn_norm, double eps,
                               const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& positions,
                               const at::Tensor& rope_cos, const at::Tensor& rope_sin) {
  at::Tensor h =
      decode_attention(x, wq, wk, wv, wo, attention_norm, eps, cache_k, cache_v, positions, rope_cos, rope_sin);
  float* hp = h.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < h.numel(); i++) hp[i] += xp[i];
  at::Tensor f = decode_feed_forward(h, w1, w3, w2, ffn_norm, eps);
  const float* fp = f.data_ptr<float>();
  for (int64_t i = 0; i < h.numel(); i++) hp[i] += fp[i];
  return h;
}

}  // namespace llama_cli_native
