// Encode and decode throughput of every codec on an activation of (8, 512, 2048) fp32, next to a
// memcpy and a tensor clone of the same bytes. GB/s are of fp32 input. `make bench` writes JSON.
// With the CUDA kernels built and a GPU present, the cuda/ rows time the same on the GPU: encode
// from a device tensor to the packet in host memory, decode from the host packet to a device
// tensor (each includes its one host/device copy of the packed bytes), next to a device clone; the
// cuda/kernel- rows time the kernels and that copy alone, to and from pinned host memory, as
// tools/ref/codec_peer.py times the same codec written in PyTorch. zstd-compress/-decompress time
// libzstd alone on the packed 4-bit codes ec=zstd hands it; rans-encode/-decode time htscodecs'
// rANS alone on ecsq:bits=4's byte symbols, in ecsq's chunks on all threads. encode-with-gates/ times what a sender
// with AMAQ's learned widths pays per micro-batch: the encode, fake_quant and the backward into the gates.
#include <benchmark/benchmark.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstring>

#include "core/device.h"
#include "core/runtime.h"
#include "quant/amaq.h"
#include "quant/bitpack.h"
#include "quant/codec.h"
#include "quant/ecsq.h"
#include "quant/entropy.h"
#include "quant/rans.h"
#if AMAQ_HAVE_CUDA
#include "quant/cuda/codec_cuda.h"
#endif

namespace {

using namespace amaq::quant;

const at::Tensor& activation() {
  static at::Tensor x = [] {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
    at::Tensor t = at::randn({8, 512, 2048}, gen);
    t.select(2, 17).mul_(40);  // an outlier channel, as real activations have
    return t;
  }();
  return x;
}

EncodeArgs args_for(const CodecSpec& spec) {
  EncodeArgs a;
  if (spec.codec == CodecId::kAmaq) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
    a.bits = at::randint(2, 7, {2048}, gen, at::kByte);  // mean ~4 bits
  }
  if (spec.codec == CodecId::kAqsgd) a.sample_ids = {0, 1, 2, 3, 4, 5, 6, 7};
  return a;
}

void set_counters(benchmark::State& state, size_t packet_bytes) {
  const double in_bytes = static_cast<double>(activation().numel()) * 4;
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * in_bytes));
  if (packet_bytes) state.counters["bits_per_element"] = 8.0 * static_cast<double>(packet_bytes) / activation().numel();
  state.counters["threads"] = at::get_num_threads();
}

void BM_Memcpy(benchmark::State& state) {
  const at::Tensor& x = activation();
  std::vector<char> dst(x.numel() * 4);
  for (auto _ : state) {
    std::memcpy(dst.data(), x.data_ptr(), dst.size());
    benchmark::DoNotOptimize(dst.data());
  }
  set_counters(state, 0);
}

void BM_Clone(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(activation().clone());
  set_counters(state, 0);
}

// `with_copy` false: what training pays, as no sender keeps a decoded copy: the packet alone (a
// sender with AMAQ's gates also computes their terms: encode-with-gates/).
void BM_Encode(benchmark::State& state, const std::string& text, bool with_copy) {
  CodecSpec spec = CodecSpec::parse(text);
  Codec codec(spec);
  EncodeArgs args = args_for(spec);
  args.want_decoded = with_copy;
  size_t bytes = codec.encode(activation(), args).packet.size();  // AQ-SGD: later passes send deltas
  for (auto _ : state) bytes = codec.encode(activation(), args).packet.size();
  set_counters(state, bytes);
}

// What a client with AMAQ's gates pays per micro-batch (Link::send_activations and the backward
// through it): the packet with each value's gate term (no decoded copy: the peer decodes),
// fake_quant's node, and the backward of a gradient through it into the gates.
void BM_EncodeWithGates(benchmark::State& state, const std::string& text) {
  const CodecSpec spec = CodecSpec::parse(text);
  Codec codec(spec);
  AmaqGates gates(activation().size(-1), spec);
  EncodeArgs args;
  args.bits = gates->bit_map();
  args.want_decoded = false;
  args.want_gate_slope = true;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2);
  const at::Tensor upstream = at::randn(activation().sizes(), gen);
  const at::Tensor x = activation().clone().requires_grad_(true);
  size_t bytes = 0;
  for (auto _ : state) {
    Encoded e = codec.encode(x, args);
    bytes = e.packet.size();
    // Into the gates only: training hands the straight-through gradient on to the layers below,
    // where a leaf x would have it copied into x.grad.
    torch::autograd::backward({fake_quant(x, e, gates->bits_continuous())}, {upstream}, false, false, {gates->gates});
  }
  set_counters(state, bytes);
}

// Rate against distortion on N(0, 1) (4096 x 1024): the measured bits per element (every packet
// byte), the NMSE, and how far the bits sit above the Gaussian bound 0.5 log2(1 / NMSE) at that NMSE
// (issue 17's goal: within 0.3 bit at 3 and 4 bits).
void BM_RateDistortion(benchmark::State& state, const std::string& text) {
  static const at::Tensor x = [] {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
    return at::randn({4096, 1024}, gen);
  }();
  const CodecSpec spec = CodecSpec::parse(text);
  Codec codec(spec);
  const EncodeArgs args = args_for(spec);
  Encoded e;
  for (auto _ : state) e = codec.encode(x, args);
  const double nmse = (e.decoded - x).pow(2).sum().item<double>() / x.pow(2).sum().item<double>();
  state.counters["bits_per_element"] = e.bits_per_element();
  state.counters["nmse"] = nmse;
  state.counters["above_gaussian_bound"] = e.bits_per_element() - 0.5 * std::log2(1.0 / nmse);
}

void BM_Decode(benchmark::State& state, const std::string& text) {
  CodecSpec spec = CodecSpec::parse(text);
  Codec sender(spec), receiver(spec);
  EncodeArgs args = args_for(spec);
  receiver.decode(sender.encode(activation(), args).packet);
  std::string packet = sender.encode(activation(), args).packet;
  for (auto _ : state) benchmark::DoNotOptimize(receiver.decode(packet));
  set_counters(state, packet.size());
}

// zstd alone on what ec=zstd gives it for fixed 4-bit: the packed codes of the activation (its
// Huffman stage bounds how close encode/decode with ec=zstd can come to plain fixed).
void BM_Zstd(benchmark::State& state, bool compress) {
  const CodecSpec spec = CodecSpec::parse("fixed:bits=4,group=128");
  const Encoded e = Codec(spec, Impl::kRef).encode(activation());  // keeps the codes
  const std::string packed = pack_ref(e.quant.codes, e.bits);
  const auto* p = reinterpret_cast<const uint8_t*>(packed.data());
  const int64_t rows = e.quant.codes.size(0), n = static_cast<int64_t>(packed.size());
  const std::string coded = entropy_encode_packed(p, n, rows, e.bits);
  for (auto _ : state) {
    if (compress)
      benchmark::DoNotOptimize(entropy_encode_packed(p, n, rows, e.bits));
    else
      benchmark::DoNotOptimize(entropy_decode(reinterpret_cast<const uint8_t*>(coded.data()),
                                              static_cast<int64_t>(coded.size()), rows, e.bits));
  }
  set_counters(state, coded.size());
}

// ecsq:bits=4's symbols of the activation (code + 32 within [-32, 32], else the escape 65), coded or
// decoded in ecsq's chunks of 2^18 on all threads.
void BM_Rans(benchmark::State& state, bool encode) {
  const at::Tensor& x = activation();
  const float step = ecsq_step(ecsq_rms(x.data_ptr<float>(), x.numel()), 4);
  const at::Tensor q = at::round(x / step);
  const at::Tensor sym = at::where(q.abs() <= 32, q + 32, at::full_like(q, 65)).to(at::kByte).contiguous();
  const uint8_t* p = sym.data_ptr<uint8_t>();
  const int64_t n = sym.numel(), chunk = int64_t{1} << 18, chunks = (n + chunk - 1) / chunk;
  std::vector<std::string> streams(static_cast<size_t>(chunks));
  auto code = [&] {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        streams[c].clear();
        rans::encode(p + c * chunk, static_cast<size_t>(std::min(chunk, n - c * chunk)), &streams[c]);
      }
    });
  };
  code();
  std::vector<uint8_t> back(static_cast<size_t>(n));
  for (auto _ : state) {
    if (encode) {
      code();
    } else {
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          rans::decode(streams[c], back.data() + c * chunk, static_cast<size_t>(std::min(chunk, n - c * chunk)));
      });
    }
  }
  size_t bytes = 0;
  for (const std::string& s : streams) bytes += s.size();
  set_counters(state, bytes);
}

// ---- CUDA --------------------------------------------------------------------------------------

const at::Tensor& device_activation() {
  static at::Tensor x = activation().to(at::kCUDA);
  return x;
}

void BM_CudaClone(benchmark::State& state) {
  for (auto _ : state) {
    at::Tensor y = device_activation().clone();
    amaq::synchronize(at::kCUDA);
  }
  set_counters(state, 0);
}

// Codec::encode as training calls it (no sender-side decoded copy): device tensor in, packet string out.
void BM_CudaEncode(benchmark::State& state, const std::string& text, at::ScalarType dtype) {
  CodecSpec spec = CodecSpec::parse(text);
  Codec codec(spec);
  EncodeArgs args = args_for(spec);
  args.want_decoded = false;
  const at::Tensor x = device_activation().to(dtype);
  size_t bytes = codec.encode(x, args).packet.size();
  for (auto _ : state) bytes = codec.encode(x, args).packet.size();  // the packet is on the host: synchronous
  set_counters(state, bytes);
}

// Codec::decode from a packet string to a device tensor of the packet's dtype.
void BM_CudaDecode(benchmark::State& state, const std::string& text, at::ScalarType dtype) {
  CodecSpec spec = CodecSpec::parse(text);
  Codec sender(spec), receiver(spec);
  EncodeArgs args = args_for(spec);
  const at::Tensor x = device_activation().to(dtype);
  receiver.decode(sender.encode(x, args).packet, at::kCUDA);
  std::string packet = sender.encode(x, args).packet;
  for (auto _ : state) {
    at::Tensor y = receiver.decode(packet, at::kCUDA);
    amaq::synchronize(at::kCUDA);
  }
  set_counters(state, packet.size());
}

#if AMAQ_HAVE_CUDA
// The kernels alone, as tools/ref/codec_peer.py times its PyTorch peer: encode from a device tensor to
// the ranges and packed codes in pinned host memory; decode from pinned host memory to a device tensor.
struct KernelCase {
  at::Tensor x, bits;
  AffineLayout layout;
  CodecSpec spec;
};

KernelCase kernel_case(const std::string& text, at::ScalarType dtype) {
  KernelCase k;
  k.spec = CodecSpec::parse(text);
  const int64_t C = activation().size(-1);
  k.x = device_activation().to(dtype).view({-1, C});
  k.bits = k.spec.codec == CodecId::kAmaq ? args_for(k.spec).bits : at::full({C}, k.spec.bits, at::kByte);
  k.layout = AffineLayout{k.x.size(0), C, k.spec.granularity, k.spec.group};
  return k;
}

void BM_CudaKernelEncode(benchmark::State& state, const std::string& text, at::ScalarType dtype) {
  const KernelCase k = kernel_case(text, dtype);
  int64_t bytes = 0;
  for (auto _ : state) {
    cuda::AffineEncoded e = cuda::affine_encode(k.x, k.bits, k.layout, k.spec.rounding, 0, false);
    bytes = e.range_bytes + e.code_bytes;
  }
  set_counters(state, static_cast<size_t>(bytes));
}

void BM_CudaKernelDecode(benchmark::State& state, const std::string& text, at::ScalarType dtype) {
  const KernelCase k = kernel_case(text, dtype);
  const cuda::AffineEncoded e = cuda::affine_encode(k.x, k.bits, k.layout, k.spec.rounding, 0, false);
  const int64_t n = e.range_bytes + e.code_bytes;
  at::Tensor host = at::empty({n}, at::TensorOptions(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), e.ranges(), static_cast<size_t>(n));
  for (auto _ : state) {
    at::Tensor y = cuda::affine_decode(host.data_ptr<uint8_t>(), n, e.scale, k.bits, k.layout, dtype, at::kCUDA);
    amaq::synchronize(at::kCUDA);
  }
  set_counters(state, static_cast<size_t>(n));
}
#endif

void register_cuda(const std::vector<const char*>& codecs) {
  if (!cuda_codecs_built() || !at::hasCUDA()) return;
  const auto ms = [](benchmark::internal::Benchmark* b) { b->Unit(benchmark::kMillisecond)->UseRealTime(); };
  ms(benchmark::RegisterBenchmark("cuda/clone", BM_CudaClone));
  for (const char* c : codecs) {
    const std::string name(c);
    const bool affine = name.rfind("aqsgd", 0) != 0;
    for (at::ScalarType t : {at::kFloat, at::kBFloat16}) {
      if (t == at::kBFloat16 && !affine) continue;
      const std::string sfx = t == at::kFloat ? "/" : "-bf16/";
      ms(benchmark::RegisterBenchmark(("cuda/encode" + sfx + name).c_str(), BM_CudaEncode, name, t));
      ms(benchmark::RegisterBenchmark(("cuda/decode" + sfx + name).c_str(), BM_CudaDecode, name, t));
#if AMAQ_HAVE_CUDA
      if (!affine) continue;
      ms(benchmark::RegisterBenchmark(("cuda/kernel-encode" + sfx + name).c_str(), BM_CudaKernelEncode, name, t));
      ms(benchmark::RegisterBenchmark(("cuda/kernel-decode" + sfx + name).c_str(), BM_CudaKernelDecode, name, t));
#endif
    }
  }
}

const char* kCodecs[] = {"none:bf16",
                         "fixed:bits=4,group=128",
                         "fixed:bits=4,group=128,rot=hadamard",
                         "fixed:bits=4,group=128,ec=zstd",
                         "fixed:bits=4,group=128,levels=nf",
                         "fixed:bits=4,group=128,levels=lloyd",
                         "fixed:bits=4,gran=token",
                         "amaq:budget=4,group=128",
                         "aqsgd:bits=4",
                         "ecsq:bits=4",
                         "ecsq:bits=3"};

int register_all() {
  benchmark::RegisterBenchmark("memcpy", BM_Memcpy)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("clone", BM_Clone)->Unit(benchmark::kMillisecond)->UseRealTime();
  for (const char* c : kCodecs) {
    benchmark::RegisterBenchmark((std::string("encode/") + c).c_str(), BM_Encode, std::string(c), true)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark((std::string("decode/") + c).c_str(), BM_Decode, std::string(c))
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    if (std::string(c).rfind("amaq", 0) == 0)  // a sender with learned widths
      benchmark::RegisterBenchmark((std::string("encode-with-gates/") + c).c_str(), BM_EncodeWithGates, std::string(c))
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    benchmark::RegisterBenchmark((std::string("encode-packet-only/") + c).c_str(), BM_Encode, std::string(c), false)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  if (entropy_coding_built()) {
    benchmark::RegisterBenchmark("zstd-compress/fixed:bits=4,group=128", BM_Zstd, true)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark("zstd-decompress/fixed:bits=4,group=128", BM_Zstd, false)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::RegisterBenchmark("rans-encode/ecsq:bits=4", BM_Rans, true)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("rans-decode/ecsq:bits=4", BM_Rans, false)->Unit(benchmark::kMillisecond)->UseRealTime();
  for (const char* c : {"fixed:bits=3,group=128", "fixed:bits=4,group=128", "fixed:bits=4,group=128,ec=zstd",
                        "fixed:bits=3,gran=token,ec=zstd", "fixed:bits=4,gran=token,ec=zstd",
                        "fixed:bits=2,group=128,levels=lloyd", "fixed:bits=3,group=128,levels=lloyd",
                        "fixed:bits=4,group=128,levels=lloyd", "fixed:bits=4,group=128,levels=lloyd,ec=zstd",
                        "fixed:bits=4,group=128,levels=nf", "ecsq:bits=3", "ecsq:bits=4"}) {
    benchmark::RegisterBenchmark((std::string("rd/") + c).c_str(), BM_RateDistortion, std::string(c))
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
  }
  register_cuda({"fixed:bits=4,group=128", "fixed:bits=4,gran=token", "amaq:budget=4,group=128", "aqsgd:bits=4"});
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  amaq::configure_threads(0);
  amaq::configure_memory();  // as `amaq` runs: freed blocks stay in the heap (no page faults per call)
  // Prime the heap: 768 MiB in 16 MiB blocks, touched and freed, coalesce into one free region that
  // stays mapped (below the 1 GiB trim threshold). Every benchmark then finds its 32 MiB buffers there
  // without page faults, as a training step does after its first, whatever benchmark ran before it.
  // (glibc serves a request above its 32 MiB mmap threshold from the heap when a free block fits.)
  {
    std::vector<void*> blocks;
    for (int i = 0; i < 48; ++i) {
      blocks.push_back(std::malloc(size_t{16} << 20));
      if (blocks.back()) std::memset(blocks.back(), 0, size_t{16} << 20);
    }
    for (void* b : blocks) std::free(b);
  }
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
