// One side's end of the compressed link: everything the codecs need, owned in one place. The
// trainer moves packets and asks the link what to put in them; which codec runs, what state it
// keeps and what goes into a checkpoint is decided here, so a new codec is a change inside
// src/quant/ only.
//
// What a link owns, per side:
//   - the forward (activations), backward (gradients) and evaluation codecs;
//   - AMAQ's gates and their AdamW group (client), and the forward map they produce;
//   - the backward budget both sides agree on (the client's BIT_SYNC, the server's copy of it) and
//     the backward map, computed once per optimizer step from the forward map the server received;
//   - AQ-SGD's per-sample memories and their checkpoint state.
#pragma once
#include <ATen/ATen.h>
#include <torch/optim/adamw.h>

#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/safetensors.h"
#include "quant/amaq.h"
#include "quant/bits_stats.h"
#include "quant/codec.h"
#include "quant/spec.h"

namespace amaq::quant {

enum class LinkSide { kClient, kServer };

/// The client's activations for one micro-batch: the packet to send and the value that enters the
/// client's graph (decode(packet), straight-through; AMAQ's gates receive their gradient through it).
struct SentActivations {
  std::string packet;
  /// (B, T, C), in the graph of the activations sent: what the peer's gradient is applied to. Its
  /// values are the activations themselves (the peer decodes the packet); with AMAQ gates it is
  /// fake_quant's node, through which the gradient also reaches the gates.
  at::Tensor value;
  BitsStats bits;
};

/// What a checkpoint holds of a link: tensors (AMAQ gates, AQ-SGD memories), whole files (the
/// gates' optimizer) and JSON fields (the backward budget).
struct LinkState {
  NamedTensors tensors;
  std::map<std::string, std::string> files;
  nlohmann::json fields = nlohmann::json::object();
};

class Link {
 public:
  /// Refuses specs that do not go together (an amaq backward codec needs an amaq forward codec).
  static void validate(const CodecSpec& fwd, const CodecSpec& bwd);
  /// `channels`: the hidden size at the split; `gate_lr`: the AMAQ gates' learning rate (client).
  Link(LinkSide side, const CodecSpec& fwd, const CodecSpec& bwd, int64_t channels, double gate_lr);
  ~Link();
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;

  const CodecSpec& forward_spec() const { return fwd_spec_; }
  /// The codec gradients actually travel with (aqsgd backward means direct per-token quantization).
  const CodecSpec& backward_spec() const { return bwd_spec_; }
  /// AQ-SGD keys its memories by sample: batches carry their ids, and every batch has seq_len rows.
  bool needs_sample_ids() const;
  bool needs_fixed_length() const { return needs_sample_ids(); }

  // ---- client ----
  /// The backward budget to tell the server before step `step`'s micro-batches, when it changed.
  std::optional<double> backward_budget_to_sync(int64_t step);
  /// Before the first micro-batch of a step: clears the gates' gradients.
  void begin_step();
  /// Encodes activations h (B, T, C) of micro-batch `micro` of step `step`.
  SentActivations send_activations(const at::Tensor& h, int64_t step, int64_t micro,
                                   const std::vector<int64_t>& sample_ids);
  /// Decodes the server's gradient packet (B, T, C) onto `device`; `bits` gets the widths it
  /// travelled with.
  /// `max_elements`: the size the receiver expects (a packet declaring more is refused unread).
  at::Tensor receive_gradients(std::string_view packet, BitsStats* bits, at::Device device = at::kCPU,
                               int64_t max_elements = kMaxPacketElements);
  /// The gates' bit regulariser for one micro-batch, weighted for `micro_batches` per step
  /// (undefined without gates); `value` gets the unweighted regulariser.
  at::Tensor regularizer(int64_t step, int64_t micro_batches, double* value);
  /// The sender's backward for one micro-batch: the peer's gradient `dh` enters the graph at the
  /// sent value (SentActivations::value) unchanged, with no surrogate product, beside the
  /// regularizer's (`reg_value` as above).
  void backward(const at::Tensor& value, const at::Tensor& dh, int64_t step, int64_t micro_batches, double* reg_value);
  /// The weight of the regulariser in the logged loss (0 without gates).
  double regularizer_weight() const;
  /// After the step's micro-batches: steps the gates (and projects them onto the budget).
  void end_step(int64_t step);
  /// Encodes activations for evaluation (AQ-SGD evaluates through its direct codec).
  std::string encode_eval(const at::Tensor& h);
  /// The forward bit map the gates learned, one width per channel; empty without gates.
  std::vector<int64_t> learned_map() const;
  /// budget=auto: whether the forward / the backward codec has its budget chosen while training.
  bool forward_budget_auto() const { return fwd_spec_.auto_budget; }
  bool backward_budget_auto() const { return bwd_spec_.auto_budget; }
  /// budget=auto: the budgets the codecs walk to from here on (each applies only to a codec with
  /// budget=auto; the backward one reaches the server by backward_budget_to_sync).
  void set_auto_budgets(double fwd, double bwd);
  /// The budgets the codecs walk to now (their specs' budget); 0 for a codec without one.
  double forward_target() const;
  double backward_target() const;

  // ---- server ----
  /// BIT_SYNC from the client.
  void set_backward_budget(double budget);
  /// The receiving end of a U-shaped split's tail link (the client), which sends the gradients: the
  /// backward budget follows the codec's schedule (toward the budget set_auto_budgets chose, with
  /// budget=auto) without a BIT_SYNC.
  void follow_backward_schedule(int64_t step);
  double backward_budget() const { return bwd_budget_; }
  /// Decodes a training (or evaluation) activation packet onto `device`; `bits` (when given) gets
  /// the widths it travelled with.
  at::Tensor receive_activations(std::string_view packet, at::Device device = at::kCPU,
                                 int64_t max_elements = kMaxPacketElements, BitsStats* bits = nullptr);
  at::Tensor receive_eval(std::string_view packet, at::Device device = at::kCPU,
                          int64_t max_elements = kMaxPacketElements);
  /// Encodes the gradient dh (B, T, C) of micro-batch `micro` of step `step`; the backward map (AMAQ)
  /// is computed once per optimizer step.
  std::string send_gradients(const at::Tensor& dh, int64_t step, int64_t micro);

  // ---- checkpoint ----
  LinkState state();
  /// A file of the checkpoint by name, or nullopt when it has none.
  using FileReader = std::function<std::optional<std::string>(const std::string& name)>;
  /// Restores state(); `dir` names the checkpoint in errors.
  void load_state(const std::map<std::string, at::Tensor>& tensors, const FileReader& read_file,
                  const nlohmann::json& fields, const std::string& dir);

 private:
  Codec& eval_codec() { return eval_ ? *eval_ : *fwd_; }
  BitsStats stats_of(const at::Tensor& map, double nominal) const;

  LinkSide side_;
  CodecSpec fwd_spec_, bwd_spec_;
  std::unique_ptr<Codec> fwd_, bwd_, eval_;  // eval_: only when the forward codec keeps memory (AQ-SGD)
  AmaqGates gates_{nullptr};                 // client, amaq forward
  std::unique_ptr<torch::optim::AdamW> gate_opt_;
  double bwd_budget_ = -1;     // amaq backward: the budget in force (server), the last one sent (client)
  int64_t bwd_map_step_ = -1;  // server: the step bwd_map_ was computed for
  at::Tensor bwd_map_;
};

}  // namespace amaq::quant
