// Our CPU kernels, registered as the operators llama_cli::int4_gemv, int8_gemv, dense_gemv (x @ W.T for a
// few fp32 rows: products.h) and llama_cli::decode_layer (one transformer layer of a decode step, or its
// halves decode_attention and decode_feed_forward: decode_layer.h), for x86 CPUs with AVX2 or AVX-512
// (vec.h). Built on first use by native.py (torch.utils.cpp_extension), called from eager code and, the
// products, from compiled steps too.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "decode_layer.h"
#include "products.h"

namespace {

using namespace llama_cli_native;

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "int4_gemv: x must be (rows, in) fp32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() && q.size(1) * 2 == x.size(1),
              "int4_gemv: q must be (out, in/2) uint8");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
              scale.is_contiguous() && offset.is_contiguous() && scale.sizes() == offset.sizes() &&
              scale.size(0) == q.size(0), "int4_gemv: scale and offset must be (out, groups) fp32");
  const int64_t rows = x.size(0), in = x.size(1), out = q.size(0), groups = scale.size(1);
  TORCH_CHECK(groups > 0 && in % groups == 0 && (in / groups) % 32 == 0,
              "int4_gemv: groups of a multiple of 32 columns");
  at::Tensor y = at::empty({rows, out}, x.options());
  int4_product(x.data_ptr<float>(), rows, in, q.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(),
               out, groups, y.data_ptr<float>());
  return y;
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
  int8_product(x.data_ptr<float>(), rows, in, q.data_ptr<int8_t>(), scale.data_ptr<float>(), out, groups,
               y.data_ptr<float>());
  return y;
}

at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "dense_gemv: x must be (rows, in) fp32");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(1) == x.size(1),
              "dense_gemv: w must be (out, in) fp32");
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  dense_product(x.data_ptr<float>(), x.size(0), x.size(1), w.data_ptr<float>(), w.size(0), y.data_ptr<float>());
  return y;
}

}  // namespace

TORCH_LIBRARY(llama_cli, m) {
  m.def("dense_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor q, Tensor scale, Tensor offset) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("decode_layer(Tensor x, Tensor[] wq, Tensor[] wk, Tensor[] wv, Tensor[] wo, Tensor[] w1, Tensor[] w3, "
        "Tensor[] w2, Tensor attention_norm, Tensor ffn_norm, float eps, Tensor(a!) cache_k, Tensor(b!) cache_v, "
        "Tensor positions, Tensor rope_cos, Tensor rope_sin) -> Tensor");
  m.def("decode_attention(Tensor x, Tensor[] wq, Tensor[] wk, Tensor[] wv, Tensor[] wo, Tensor attention_norm, "
        "float eps, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor positions, Tensor rope_cos, Tensor rope_sin) -> Tensor");
  m.def("decode_feed_forward(Tensor h, Tensor[] w1, Tensor[] w3, Tensor[] w2, Tensor ffn_norm, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(llama_cli, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("dense_gemv", &dense_gemv);
  m.impl("decode_layer", &decode_layer);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_feed_forward", &decode_feed_forward);
}
