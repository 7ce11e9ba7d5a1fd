// Our CPU kernels, registered as the operators llama_cli::int4_gemv, int8_gemv, dense_gemv (x @ W.T for fp32
// rows x, the weight quantized or dense in fp32, bf16 or fp16: products.h) and llama_cli::decode_layer (one
// transformer layer of a decode step, or its halves decode_attention and decode_feed_forward: decode_layer.h),
// for x86 CPUs with AVX2 or AVX-512 (vec.h). Built on first use by native.py (torch.utils.cpp_extension), called
// from eager code and, the products, from compiled steps too.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "decode_layer.h"
#include "products.h"

namespace {

using namespace llama_cli_native;

// x @ W.T for x (rows, in) fp32 and a weight in one of Weight's forms
at::Tensor product(const char* who, const at::Tensor& x, at::TensorList parts) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), who, ": x must be (rows, in) fp32");
  const Weight w(parts, who, "the weight");
  TORCH_CHECK(w.in == x.size(1), who, ": the weight (q (out, in/2) uint8 for int4, (out, in) otherwise) ",
              "does not fit x's ", x.size(1), " columns");
  at::Tensor y = at::empty({x.size(0), w.out}, x.options());
  w.apply(x.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  return y;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset) {
  return product("int4_gemv", x, {q, scale, offset});
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  return product("int8_gemv", x, {q, scale});
}

at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& w) { return product("dense_gemv", x, {w}); }

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
