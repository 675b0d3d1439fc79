#include "recipes/codec_curve.h"

#include <cmath>

#include "core/error.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "quant/codec.h"
#include "train/data.h"

namespace amaq::recipes {

nlohmann::json CodecPoint::to_json() const {
  return {{"codec", codec}, {"tensor", tensor}, {"bits", bits}, {"nmse", nmse}};
}

SplitTensors split_tensors(const std::string& model_dir, const std::string& data_path, const Tokenizer& tok,
                           int64_t seq_len, int64_t rows, int64_t split) {
  const ModelConfig config = ModelConfig::load(model_dir);
  const CheckpointReader ckpt(model_dir);
  DecoderPart client = client_part(config, split), server = server_part(config, split);
  client->load_weights(ckpt);
  server->load_weights(ckpt);
  client->eval();
  server->eval();
  const train::Dataset d = train::Dataset::load(data_path, tok, seq_len);
  if (d.examples.empty()) throw Error(data_path + " holds no example", "give a data file with text in it");
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < std::min<int64_t>(rows, static_cast<int64_t>(d.examples.size())); ++i) idx.push_back(i);
  const train::Batch b = train::make_batch(d, idx, tok.eos_id() >= 0 ? tok.eos_id() : 0);
  SplitTensors out;
  {
    at::NoGradGuard no_grad;
    out.activations = client->forward(b.ids, b.mask);
  }
  const at::Tensor h = out.activations.clone().requires_grad_(true);
  causal_lm_loss(server->forward(h, b.mask), b.labels).backward();
  out.gradients = h.grad().detach();
  return out;
}

std::vector<CodecPoint> codec_points(const SplitTensors& t, const std::vector<std::string>& codecs) {
  std::vector<CodecPoint> out;
  for (const std::string& text : codecs) {
    const quant::CodecSpec spec = quant::CodecSpec::parse(text);
    if (spec.codec == quant::CodecId::kAmaq || spec.codec == quant::CodecId::kAqsgd) {
      throw Error("codec-curve runs codecs without learned maps or memories; " + text + " has one",
                  "measure its quantizer at one width with fixed:bits=B (or a map with fixed:map=FILE)");
    }
    for (const auto& [name, x] : {std::pair{"activations", t.activations}, std::pair{"gradients", t.gradients}}) {
      quant::Codec tx(spec), rx(spec);
      quant::EncodeArgs args;
      args.want_decoded = false;  // the receiver's decode is what is measured
      const quant::Encoded e = tx.encode(x, args);
      const at::Tensor d = rx.decode(e.packet).to(at::kDouble), xd = x.to(at::kDouble);
      CodecPoint p;
      p.codec = spec.to_string();
      p.tensor = name;
      p.bits = e.bits_per_element();
      p.nmse = ((d - xd).pow(2).sum() / xd.pow(2).sum()).item<double>();
      out.push_back(p);
    }
  }
  return out;
}

}  // namespace amaq::recipes
