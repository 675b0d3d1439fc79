#include "model/gemm.h"

#include <torch/csrc/autograd/custom_function.h>

#if AMAQ_HAVE_DNNL
#include <map>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>
#include <unordered_map>
#endif

namespace amaq::functional {

#if AMAQ_HAVE_DNNL
namespace {

// One matmul primitive per shape, dst (M, N) = src (M, K) x weights (K, N) [+ bias (1, N)], all
// plain row-major fp32. `weights_transposed`: the (K, N) weights are the (N, K) matrix W read
// transposed (forward: x W^T); otherwise W itself as (K, N) (backward: dy W).
class Matmuls {
 public:
  void run(const float* src, const float* weights, const float* bias, float* dst, int64_t M, int64_t K, int64_t N,
           bool weights_transposed) {
    using dnnl::memory;
    const Key key{M, K, N, weights_transposed, bias != nullptr};
    Entry* e;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = cache_.find(key);
      if (it == cache_.end()) {
        Entry n;
        n.src = memory::desc({M, K}, memory::data_type::f32, memory::format_tag::ab);
        n.weights = memory::desc({K, N}, memory::data_type::f32,
                                 weights_transposed ? memory::format_tag::ba : memory::format_tag::ab);
        n.bias = memory::desc({1, N}, memory::data_type::f32, memory::format_tag::ab);
        n.dst = memory::desc({M, N}, memory::data_type::f32, memory::format_tag::ab);
        const dnnl::matmul::desc d =
            bias ? dnnl::matmul::desc(n.src, n.weights, n.bias, n.dst) : dnnl::matmul::desc(n.src, n.weights, n.dst);
        n.prim = dnnl::matmul(dnnl::matmul::primitive_desc(d, engine_));
        it = cache_.emplace(key, std::move(n)).first;
      }
      e = &it->second;
    }
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, memory(e->src, engine_, const_cast<float*>(src))},
                                         {DNNL_ARG_WEIGHTS, memory(e->weights, engine_, const_cast<float*>(weights))},
                                         {DNNL_ARG_DST, memory(e->dst, engine_, dst)}};
    if (bias) args.emplace(DNNL_ARG_BIAS, memory(e->bias, engine_, const_cast<float*>(bias)));
    dnnl::stream stream(engine_);
    e->prim.execute(stream, args);
    stream.wait();
  }

 private:
  using Key = std::tuple<int64_t, int64_t, int64_t, bool, bool>;
  struct Entry {
    dnnl::matmul prim;
    dnnl::memory::desc src, weights, bias, dst;
  };
  dnnl::engine engine_{dnnl::engine::kind::cpu, 0};
  std::mutex mu_;
  std::map<Key, Entry> cache_;  // std::map: entries stay put while others are added
};

Matmuls& matmuls() {
  static Matmuls m;
  return m;
}

struct FrozenLinearFn : public torch::autograd::Function<FrozenLinearFn> {
  // x2 (M, K) contiguous fp32; weight (N, K); bias (N) or empty.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x2, const at::Tensor& weight,
                            const at::Tensor& bias) {
    ctx->saved_data["weight"] = weight;  // frozen: not a saved variable of the graph
    const int64_t M = x2.size(0), K = x2.size(1), N = weight.size(0);
    at::Tensor y = at::empty({M, N}, x2.options());
    if (M > 0) {
      matmuls().run(x2.data_ptr<float>(), weight.data_ptr<float>(), bias.numel() ? bias.data_ptr<float>() : nullptr,
                    y.data_ptr<float>(), M, K, N, /*weights_transposed=*/true);
    }
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor weight = ctx->saved_data["weight"].toTensor();
    const at::Tensor dy = grads[0].contiguous();  // (M, N)
    const int64_t M = dy.size(0), N = dy.size(1), K = weight.size(1);
    at::Tensor dx = at::empty({M, K}, dy.options());
    if (M > 0)
      matmuls().run(dy.data_ptr<float>(), weight.data_ptr<float>(), nullptr, dx.data_ptr<float>(), M, N, K, false);
    return {dx, at::Tensor(), at::Tensor()};
  }
};

}  // namespace
#endif

bool frozen_linear_uses_onednn(const at::Tensor& x, const at::Tensor& weight) {
#if AMAQ_HAVE_DNNL
  const bool trainable = weight.requires_grad();
  return !trainable && x.device().is_cpu() && weight.device().is_cpu() && x.scalar_type() == at::kFloat &&
         weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 2;
#else
  (void)x, (void)weight;
  return false;
#endif
}

at::Tensor frozen_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
#if AMAQ_HAVE_DNNL
  if (frozen_linear_uses_onednn(x, weight) &&
      (!bias.defined() || (!bias.requires_grad() && bias.scalar_type() == at::kFloat))) {
    std::vector<int64_t> out_shape = x.sizes().vec();
    out_shape.back() = weight.size(0);
    const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
    const at::Tensor b = bias.defined() ? bias.contiguous() : at::empty({0}, x.options());
    return FrozenLinearFn::apply(x2, weight, b).view(out_shape);
  }
#endif
  return at::linear(x, weight, bias);
}

}  // namespace amaq::functional
