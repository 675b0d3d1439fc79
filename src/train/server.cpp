// The server side of a run: one Session per client connection (see session.h for the protocol).
// A session opens its run from the client's SCHEDULE, then answers each message with its handler.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <optional>

#include "core/compute.h"
#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/json.h"
#include "model/part.h"
#include "quant/link.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/eval.h"
#include "train/federation.h"
#include "train/session.h"
#include "train/session_util.h"
#include "train/side.h"
#include "wire/handshake.h"
#include "wire/messages.h"

namespace amaq::train {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

wire::Status bad(std::string why) {
  return wire::Status::Fail(wire::ErrorCode::kBadMessage, std::move(why));
}

// A CONTROL body's "step": a JSON integer, or the refusal that names it.
wire::Status read_step(const nlohmann::json& j, int64_t* step) {
  try {
    *step = json_int<int64_t>(j, "step");
  } catch (const Error& e) {
    return bad(std::string("CONTROL: ") + e.what());
  }
  return wire::Status::Ok();
}

// A federation member's backward accumulates into its own gradients: in the shared parameters while
// this lives (nothing without a federation), taken out with the tokens they were computed on.
class FederationGradients {
 public:
  FederationGradients(Federation* fed, const std::string& run_id, int64_t tokens)
      : fed_(fed), run_id_(run_id), tokens_(tokens) {
    if (fed_) fed_->install(run_id_);
  }
  ~FederationGradients() {
    if (fed_) fed_->uninstall(run_id_, tokens_);
  }
  FederationGradients(const FederationGradients&) = delete;
  FederationGradients& operator=(const FederationGradients&) = delete;

 private:
  Federation* fed_;
  const std::string& run_id_;
  int64_t tokens_;
};

}  // namespace

class TrainServer::Session {
 public:
  Session(TrainServer& srv, wire::Channel& ch, uint64_t id, std::optional<wire::Hello> hello)
      : srv_(srv), cfg_(srv.cfg_), ch_(ch), id_(id), hello_(std::move(hello)) {}
  ~Session() {
    if (fed_) srv_.leave_federation(fed_, run_id_);
    if (!admitted_) return;
    std::lock_guard<std::mutex> lock(srv_.admit_mu_);
    --srv_.admissions_.live;
    srv_.admissions_.live_bytes -= srv_.run_bytes_;
    srv_.run_status_.erase(id_);
  }
  /// Handshake, SCHEDULE, then one handler per message until BYE or a failure.
  wire::Status serve();

 private:
  // A decoded FORWARD / EVAL: the activations and the labels and mask as tensors.
  struct Inputs {
    wire::ForwardMsg msg;
    at::Tensor h, labels, mask;  // (B, T, C), (B, T) int64, (B, T) int64 or undefined
  };
  wire::Status open_run();
  wire::Status read_schedule();
  wire::Status lock_run();
  /// Within --max-runs and the memory budget, or told to retry (kBusy) or that it never fits (kOverBudget).
  wire::Status admit_run();
  wire::Status build_run();
  wire::Status decode_inputs(const wire::Frame& f, bool train, Inputs* in);
  wire::Status on_forward(const wire::Frame& f);
  /// U-shaped split, FORWARD: the middle layers, their output out to the client as TAIL_FORWARD; the
  /// graph waits in `tail_pending_` for the client's TAIL_BACKWARD.
  wire::Status on_forward_tail(const wire::Frame& f);
  /// U-shaped split, TAIL_BACKWARD: the oldest waiting micro-batch backward, its gradient as BACKWARD.
  wire::Status on_tail_backward(const wire::Frame& f);
  /// A message that needs no micro-batch of a U-shaped step half done; otherwise why not.
  wire::Status no_tail_pending(const char* what);
  wire::Status on_eval(const wire::Frame& f);
  /// Status page and latency histogram: one micro-batch served in `seconds`.
  void record_micro_batch(uint64_t fwd_packet_bytes, uint64_t bwd_packet_bytes, uint64_t elements, double seconds);
  wire::Status on_control(const wire::Frame& f);
  wire::Status on_step(const nlohmann::json& j);
  /// BIT_SYNC: the backward budget at the split; in a U-shaped run with budget=auto, the budget the
  /// tail link's gates (this side's) walk to.
  wire::Status on_bit_sync(const nlohmann::json& j);
  /// A federation member whose last STEP is not yet part of a complete round waits for it (its
  /// weights are the round's); false when the wait failed (`*s` says why).
  bool wait_for_round(wire::Status* s);
  /// On the compute thread: the optimizer step STEP asked for (a federation's: its completed rounds'),
  /// if it has not been taken yet.
  void take_pending_step();
  /// FED_AVG: this client's trained tensors in, the federation's token-weighted average back.
  wire::Status on_fed_avg(const nlohmann::json& j, const std::string& blob);
  wire::Status on_checkpoint(const nlohmann::json& j);
  wire::Status on_bye();
  /// The server is stopping: tell the client at this step boundary, then serve its checkpoint and BYE.
  wire::Status stop();
  /// A protocol violation or refusal: logged, told to the client, the session ends.
  wire::Status fail(wire::Status why);
  /// The link failed (the client vanished, or a send or receive timed out): the run's state stays on
  /// disk for a resume.
  wire::Status dropped(wire::Status why);

  TrainServer& srv_;
  const ServerConfig& cfg_;
  wire::Channel& ch_;
  uint64_t id_;
  std::optional<wire::Hello> hello_;  // set when the TCP server authenticated the client already
  // The run this session serves.
  std::string run_id_, root_;
  Schedule schedule_;
  std::string federation_;  // "" : none
  int64_t fed_clients_ = 1;
  int64_t batch_ = 0, seq_len_ = 0, resume_step_ = -1;
  std::unique_lock<std::timed_mutex> run_lock_;  // one session per run at a time
  bool admitted_ = false;
  Side own_side_;                    // the run's own side; a federation member trains the federation's
  std::shared_ptr<Federation> fed_;  // --federation: the federation this run is a member of
  Side& side() { return fed_ ? fed_->side : own_side_; }
  GraphedBackward graphed_;  // --cuda-graph
  std::unique_ptr<quant::Link> link_;
  std::unique_ptr<quant::Link> tail_link_;  // U-shaped split: this side sends the activations at the tail split
  // U-shaped split: micro-batches sent out as TAIL_FORWARD whose TAIL_BACKWARD has not come yet, in
  // order (the client's --in-flight keeps several on their way); at most the step's micro-batches.
  struct TailPending {
    uint64_t step = 0, forward_packet_bytes = 0;  // (the FORWARD's views into its frame are not kept)
    uint32_t micro_batch = 0;
    at::Tensor h;                 // the activations at K, a leaf whose gradient goes back
    quant::SentActivations sent;  // the activations at M as sent (in this side's graph)
    double seconds = 0, codec_seconds = 0;
    double forward_arrival_seconds = 0;
    int64_t tokens = 0;  // the micro-batch's input tokens: its weight in a federation's round
  };
  std::deque<TailPending> tail_pending_;
  int64_t tail_started_ = 0;  // FORWARDs of this step taken so far
  std::unique_ptr<JsonlLog> log_;
  int64_t step_ = 0;  // optimizer steps completed (the last one perhaps still pending)
  // STEP's lr and clip coefficient, applied when the next message needs the weights: while the
  // client computes its own step and next forward, this process leaves the cores to it (on one
  // machine, two processes computing at once oversubscribe them).
  // In a federation the shared side steps by rounds (Federation): this then steps only the run's own
  // gates at M.
  std::optional<std::pair<double, double>> pending_step_;
  double loss_sum_ = 0, seconds_ = 0;
  int micro_ = 0;
};

TrainServer::TrainServer(ServerConfig cfg) : cfg_(std::move(cfg)) {
  model_ = ModelConfig::load(cfg_.model);
  ckpt_ = std::make_unique<CheckpointReader>(cfg_.model);
  fingerprint_ = model_fingerprint(model_, *ckpt_);
  if (cfg_.split < 1 || cfg_.split >= model_.num_layers) {
    throw Error("split " + std::to_string(cfg_.split) + " outside [1, " + std::to_string(model_.num_layers - 1) + "]",
                "the client keeps layers [0, K) and the server [K, L)");
  }
  quant::Link::validate(cfg_.fwd_codec, cfg_.bwd_codec);
  check_cuda_graph(cfg_.side, parse_device(cfg_.side.device));
  if (cfg_.tail_split != 0) {
    check_tail_split(model_, cfg_.split, cfg_.tail_split);
    check_tail_codecs(cfg_.fwd_codec, cfg_.bwd_codec, cfg_.tail_fwd_codec, cfg_.tail_bwd_codec);
    if (cfg_.side.cuda_graph) {
      throw Error("--cuda-graph captures a step that ends in the loss; with a tail split the loss is on the client",
                  "leave out --cuda-graph or --tail-split");
    }
  }
  run_bytes_ = owned_bytes_estimate(model_, SideRole::kServer, cfg_.split, cfg_.side, cfg_.tail_split);
  make_dirs(cfg_.run_dir);
}

TrainServer::~TrainServer() = default;

const std::map<std::string, at::Tensor>& TrainServer::shared_base() {
  std::lock_guard<std::mutex> lock(base_mu_);
  if (base_.empty()) {
    DecoderPart part{nullptr};
    {
      UnfilledBaseWeights unfilled;  // loaded next
      part = side_parts(model_, SideRole::kServer, cfg_.split, cfg_.tail_split,
                        compute_options(cfg_.side.device, cfg_.side.dtype))[0];
    }
    part->load_weights(*ckpt_);
    uint64_t bytes = 0;
    for (auto& [name, t] : part->base_weights()) {
      base_.emplace(name, t);
      bytes += static_cast<uint64_t>(t.nbytes());
    }
    base_bytes_ = bytes;
  }
  return base_;
}

wire::Status TrainServer::join_federation(const std::string& name, int64_t clients, const std::string& run_id,
                                          std::shared_ptr<Federation>* out) {
  std::lock_guard<std::mutex> lock(fed_mu_);
  auto& fed = federations_[name];
  if (!fed) fed = std::make_shared<Federation>(name, clients);
  wire::Status s = fed->join(run_id, clients);
  if (s.ok()) *out = fed;
  if (!s.ok() && fed->members() == 0) federations_.erase(name);
  return s;
}

void TrainServer::leave_federation(const std::shared_ptr<Federation>& fed, const std::string& run_id) {
  std::lock_guard<std::mutex> lock(fed_mu_);
  if (fed->leave(run_id) > 0) return;
  auto it = federations_.find(fed->name());
  if (it != federations_.end() && it->second == fed) federations_.erase(it);
}

TrainServer::Status TrainServer::status() {
  Status s;
  s.shared_base_bytes = base_bytes_;
  std::lock_guard<std::mutex> lock(admit_mu_);
  s.admissions = admissions_;
  for (const auto& [id, r] : run_status_) s.runs.push_back(r);
  s.latency = latency_;
  s.steps_served = steps_served_;
  return s;
}

uint64_t TrainServer::max_payload() const {
  // Frames carry at most max(batch * seq) activations; allow 64K tokens of fp32 per micro-batch.
  return wire::max_payload_for(1, 65536, static_cast<uint64_t>(model_.hidden_size));
}

wire::Status TrainServer::serve(wire::Channel& ch, uint64_t session_id) {
  return serve(ch, wire::SessionContext{session_id, "", std::nullopt});
}

wire::ServerPolicy TrainServer::policy() const {
  wire::ServerPolicy p;
  p.model_fingerprint = fingerprint_;
  p.split = cfg_.split;
  p.fwd_codec = cfg_.fwd_codec.to_string();
  p.bwd_codec = cfg_.bwd_codec.to_string();
  p.tail_split = cfg_.tail_split;
  if (cfg_.tail_split != 0) {
    p.tail_fwd_codec = cfg_.tail_fwd_codec.to_string();
    p.tail_bwd_codec = cfg_.tail_bwd_codec.to_string();
  }
  if (cfg_.client_codecs) {
    // Each cut's pair here; a U-shaped run's four together when the run is built.
    p.accept_codecs = [](const std::string& fwd, const std::string& bwd) {
      try {
        quant::Link::validate(quant::CodecSpec::parse(fwd), quant::CodecSpec::parse(bwd));
      } catch (const Error& e) {
        return wire::Status::Fail(wire::ErrorCode::kCodecMismatch,
                                  std::string("codecs this server cannot serve: ") + e.what());
      }
      return wire::Status::Ok();
    };
  }
  p.token = cfg_.token;
  p.settings = {{"max_payload", max_payload()}};
  return p;
}

wire::ServerOptions TrainServer::tcp_options(uint16_t port) const {
  wire::ServerOptions o(port);
  o.max_payload(max_payload()).handshake(policy());
  return o;
}

wire::Status TrainServer::serve(wire::Channel& ch, const wire::SessionContext& context) {
  const uint64_t session_id = context.id;
  try {
    return Session(*this, ch, session_id, context.hello).serve();
  } catch (const std::exception& e) {
    const auto* c10 = dynamic_cast<const c10::Error*>(&e);
    wire::Status s = wire::Status::Fail(wire::ErrorCode::kInternal, c10 ? c10->what_without_backtrace() : e.what());
    spdlog::error("session {}: {}", session_id, s.message);
    wire::refuse(ch, s);
    return s;
  }
}

wire::Status TrainServer::Session::serve() {
  wire::Status s;
  if (!hello_) {
    wire::Hello hello;
    s = wire::server_handshake(ch_, srv_.policy(), id_, cfg_.handshake_timeout, &hello);
    if (!s.ok()) {
      spdlog::warn("session {}: handshake failed: {} ({})", id_, s.message, wire::error_name(s.code));
      return s;
    }
    hello_ = std::move(hello);
  }
  s = open_run();
  if (!s.ok()) return s;
  while (true) {
    wire::Frame f;
    s = ch_.receive(&f, cfg_.idle_timeout);
    if (!s.ok()) return dropped(s);
    // A new step or an evaluation is the boundary where a stopping server tells its client.
    if (srv_.stopping_ && micro_ == 0 && tail_started_ == 0 &&
        (f.type == wire::MessageType::kForward || f.type == wire::MessageType::kEval))
      return stop();
    switch (f.type) {
      case wire::MessageType::kBye:
        return on_bye();
      case wire::MessageType::kForward:
        s = on_forward(f);
        break;
      case wire::MessageType::kTailBackward:
        if (!tail_link_) return fail(bad("TAIL_BACKWARD, but this run has no tail split"));
        s = on_tail_backward(f);
        break;
      case wire::MessageType::kEval:
        if (s = no_tail_pending("EVAL"); !s.ok()) return fail(s);
        s = on_eval(f);
        break;
      case wire::MessageType::kControl:
        s = on_control(f);
        break;
      default:
        return fail(bad(std::string("unexpected ") + wire::message_name(f.type)));
    }
    if (!s.ok()) return s;
  }
}

wire::Status TrainServer::Session::fail(wire::Status why) {
  spdlog::warn("session {}: {} ({})", id_, why.message, wire::error_name(why.code));
  wire::refuse(ch_, why);
  return why;
}

wire::Status TrainServer::Session::dropped(wire::Status why) {
  spdlog::warn("session {}: run {} dropped after step {}: {} ({})", id_, run_id_, step_, why.message,
               wire::error_name(why.code));
  return why;
}

// SCHEDULE: which run, from which step, with what schedule; the run is built fresh or restored
// from the checkpoint the client resumes from.
wire::Status TrainServer::Session::open_run() {
  wire::Status s = read_schedule();
  if (s.ok()) s = lock_run();
  if (s.ok()) s = admit_run();
  if (s.ok()) s = build_run();
  if (!s.ok()) return s;
  s = detail::send_control(ch_, wire::ControlKind::kSchedule,
                           {{"resume_step", resume_step_},
                            {"side", side().options.to_json()},
                            {"layers", {cfg_.split, cfg_.tail_split != 0 ? cfg_.tail_split : srv_.model_.num_layers}}});
  if (!s.ok()) return s;
  spdlog::info("session {}: run {} {} at step {} ({} steps, {} x {} tokens x {} micro-batches)", id_, run_id_,
               resume_step_ >= 0 ? "resumed" : "started", step_, schedule_.steps, batch_, seq_len_,
               schedule_.micro_batches);
  return wire::Status::Ok();
}

// The client's SCHEDULE, every field checked.
wire::Status TrainServer::Session::read_schedule() {
  wire::Frame f;
  nlohmann::json j;
  wire::Status s = detail::expect(ch_, wire::MessageType::kControl, cfg_.handshake_timeout, &f);
  if (s.ok()) s = detail::parse_control(f, wire::ControlKind::kSchedule, &j);
  if (!s.ok()) return fail(s);
  try {
    const ScheduleRequest r = ScheduleRequest::from_json(j);
    run_id_ = r.run_id;
    resume_step_ = r.resume_step;
    batch_ = r.batch;
    seq_len_ = r.seq_len;
    schedule_ = r.schedule;
    federation_ = r.federation;
    fed_clients_ = r.fed_clients;
  } catch (const Error& e) {
    return fail(bad(e.what()));
  }
  return wire::Status::Ok();
}

// One session per run: a reconnecting client waits for its old session to end.
wire::Status TrainServer::Session::lock_run() {
  std::shared_ptr<std::timed_mutex> run_mu;
  {
    std::lock_guard<std::mutex> lock(srv_.runs_mu_);
    auto& m = srv_.runs_[run_id_];
    if (!m) m = std::make_shared<std::timed_mutex>();
    run_mu = m;
  }
  run_lock_ = std::unique_lock<std::timed_mutex>(*run_mu, std::defer_lock);
  if (!run_lock_.try_lock_for(std::chrono::seconds(30))) {
    return fail(
        wire::Status::Fail(wire::ErrorCode::kResume, "run " + run_id_ + " already has a live session on this server"));
  }
  return wire::Status::Ok();
}

wire::Status TrainServer::Session::admit_run() {
  const uint64_t need = srv_.run_bytes_, budget = cfg_.run_memory_budget;
  auto mb = [](uint64_t b) { return std::to_string((b + (1 << 20) - 1) >> 20) + " MB"; };
  std::lock_guard<std::mutex> lock(srv_.admit_mu_);
  Admissions& a = srv_.admissions_;
  if (budget > 0 && need > budget) {
    ++a.over_budget;
    return fail(wire::Status::Fail(wire::ErrorCode::kOverBudget,
                                   "this run's server side would own about " + mb(need) +
                                       ", more than the server's --run-memory-budget of " + mb(budget) +
                                       "\n  hint: train LoRA on the server side, or ask for a larger budget"));
  }
  std::string why;
  if (cfg_.max_runs > 0 && a.live >= cfg_.max_runs) {
    why = std::to_string(a.live) + " runs are training (--max-runs " + std::to_string(cfg_.max_runs) + ")";
  } else if (budget > 0 && a.live_bytes + need > budget) {
    why = "live runs own " + mb(a.live_bytes) + " of the " + mb(budget) + " budget and this run needs " + mb(need);
  }
  if (!why.empty()) {
    ++a.busy;
    return fail(wire::Status::Fail(
        wire::ErrorCode::kBusy, "server busy: " + why + "; try again when a run ends (the client retries by itself)"));
  }
  a.peak = std::max(a.peak, ++a.live);
  a.live_bytes += need;
  RunStatus& rs = srv_.run_status_[id_];
  rs.run_id = run_id_;
  rs.federation = federation_;
  rs.session = id_;
  rs.steps = schedule_.steps;
  rs.step = std::max<int64_t>(0, resume_step_);
  rs.fwd_codec = hello_ ? hello_->fwd_codec : cfg_.fwd_codec.to_string();
  rs.bwd_codec = hello_ ? hello_->bwd_codec : cfg_.bwd_codec.to_string();
  admitted_ = true;
  return wire::Status::Ok();
}

// This side of the run: fresh, or from its checkpoint at the client's resume step.
wire::Status TrainServer::Session::build_run() {
  root_ = join_path(cfg_.run_dir, run_id_);
  remove_stale_temps(root_);
  const std::string dir = checkpoint_path(root_, resume_step_);
  if (resume_step_ >= 0 && !file_exists(dir)) {
    std::string have;
    for (int64_t st : list_checkpoints(root_)) have += (have.empty() ? "" : ", ") + std::to_string(st);
    return fail(wire::Status::Fail(wire::ErrorCode::kResume,
                                   "no checkpoint of run " + run_id_ + " at step " + std::to_string(resume_step_) +
                                       " on the server (it has: " + (have.empty() ? "none" : have) +
                                       ")\n  hint: resume from a checkpoint both sides hold, or start a new run"));
  }
  if (resume_step_ < 0 && !list_checkpoints(root_).empty()) {
    return fail(wire::Status::Fail(wire::ErrorCode::kResume,
                                   "run " + run_id_ +
                                       " already has checkpoints on the server\n  hint: resume it (--resume) "
                                       "instead of starting it again"));
  }
  if (!federation_.empty()) {
    if (cfg_.side.cuda_graph) {
      return fail(
          wire::Status::Fail(wire::ErrorCode::kFederation,
                             "this server captures CUDA graphs (--cuda-graph), which a federation cannot use"
                             "\n  hint: train without --federation, or restart the server without --cuda-graph"));
    }
    wire::Status s = srv_.join_federation(federation_, fed_clients_, run_id_, &fed_);
    if (!s.ok()) return fail(s);
  }
  if (cfg_.client_codecs && cfg_.tail_split != 0) {
    try {
      check_tail_codecs(quant::CodecSpec::parse(hello_->fwd_codec), quant::CodecSpec::parse(hello_->bwd_codec),
                        quant::CodecSpec::parse(hello_->tail_fwd_codec),
                        quant::CodecSpec::parse(hello_->tail_bwd_codec));
    } catch (const Error& e) {
      return fail(wire::Status::Fail(wire::ErrorCode::kCodecMismatch,
                                     std::string("codecs this server cannot serve: ") + e.what()));
    }
  }
  bool own_state = true;  // whether a resumed run restores the server side from its checkpoint
  compute::run([&] {
    if (!fed_ || !fed_->built) {
      Side built = Side::build(srv_.model_, *srv_.ckpt_, SideRole::kServer, cfg_.split, cfg_.side, schedule_.seed + 1,
                               schedule_.weight_decay, cfg_.side.full ? nullptr : &srv_.shared_base(), cfg_.tail_split);
      (fed_ ? fed_->side : own_side_) = std::move(built);
      if (fed_) fed_->built = true;
    } else {
      own_state = false;  // a live federation's shared side is newer than any one member's checkpoint
    }
    // The handshake accepted the client's codecs: its own with --client-codecs, else the server's.
    const quant::CodecSpec fwd = cfg_.client_codecs ? quant::CodecSpec::parse(hello_->fwd_codec) : cfg_.fwd_codec,
                           bwd = cfg_.client_codecs ? quant::CodecSpec::parse(hello_->bwd_codec) : cfg_.bwd_codec;
    link_ =
        std::make_unique<quant::Link>(quant::LinkSide::kServer, fwd, bwd, srv_.model_.hidden_size, schedule_.gate_lr);
    if (cfg_.tail_split != 0) {
      // At the tail split this side sends the activations: the link's sending end (its gates, if AMAQ).
      const quant::CodecSpec tf = cfg_.client_codecs ? quant::CodecSpec::parse(hello_->tail_fwd_codec)
                                                     : cfg_.tail_fwd_codec,
                             tb = cfg_.client_codecs ? quant::CodecSpec::parse(hello_->tail_bwd_codec)
                                                     : cfg_.tail_bwd_codec;
      tail_link_ =
          std::make_unique<quant::Link>(quant::LinkSide::kClient, tf, tb, srv_.model_.hidden_size, schedule_.gate_lr);
    }
    if (resume_step_ >= 0) load_side_checkpoint(dir, own_state ? &side() : nullptr, *link_, tail_link_.get());
  });
  if (resume_step_ >= 0) step_ = resume_step_;
  make_dirs(root_);
  log_ = std::make_unique<JsonlLog>(join_path(root_, "metrics.jsonl"));
  return wire::Status::Ok();
}

// FORWARD / EVAL body: every field checked against the run before use (on the compute thread:
// decoding is compute; the caller tells the client when it fails).
wire::Status TrainServer::Session::decode_inputs(const wire::Frame& f, bool train, Inputs* in) {
  wire::Status s = wire::ForwardMsg::decode(f.payload, &in->msg);
  if (!s.ok()) return s;
  const wire::ForwardMsg& fm = in->msg;
  const int64_t B = fm.batch, T = fm.seq, C = srv_.model_.hidden_size;
  const bool tail = cfg_.tail_split != 0;
  if (!tail && fm.label_type == wire::LabelType::kNone) return bad("FORWARD/EVAL without labels");
  if (tail && fm.label_type != wire::LabelType::kNone)
    return bad("FORWARD/EVAL with labels in a U-shaped split: the labels stay on the client");
  // The shape the packet must have, bounded by the run's before anything is decoded (evaluation rows
  // may be longer: a classification prompt plus its label word).
  const int64_t max_seq = train ? seq_len_ : std::max<int64_t>(seq_len_, srv_.model_.max_position_embeddings);
  if (B < 1 || B > batch_ || T < 1 || T > max_seq) {
    return bad("FORWARD/EVAL of " + std::to_string(B) + " x " + std::to_string(T) + " tokens, beyond the run's " +
               std::to_string(batch_) + " x " + std::to_string(max_seq));
  }
  try {
    const int64_t expected = B * T * C;  // ScheduleRequest bounds batch x seq_len; FORWARD's within them
    in->h = train ? link_->receive_activations(fm.packet, side().device(), expected)
                  : link_->receive_eval(fm.packet, side().device(), expected);
  } catch (const Error& e) {
    return bad(e.what());
  }
  if (in->h.dim() != 3 || in->h.size(0) != B || in->h.size(1) != T || in->h.size(2) != C) {
    return bad("activation shape does not match (batch, seq, hidden)");
  }
  if (!fm.mask.empty()) in->mask = at::from_blob(const_cast<char*>(fm.mask.data()), {B, T}, at::kByte).to(at::kLong);
  if (tail) return wire::Status::Ok();
  in->labels = at::from_blob(const_cast<char*>(fm.labels.data()), {B, T}, detail::label_scalar(fm.label_type))
                   .to(at::kLong, false, true);
  const at::Tensor valid = (in->labels == kIgnoreLabel) | ((in->labels >= 0) & (in->labels < srv_.model_.vocab_size));
  if (!valid.all().item<bool>()) {
    return bad("labels outside [0, " + std::to_string(srv_.model_.vocab_size) + ") other than the ignore label -100");
  }
  in->labels = in->labels.to(side().device());  // the mask stays on the CPU: the part reads it there
  return wire::Status::Ok();
}

// FORWARD: the server's layers and the loss, backward to the activations, their gradient back.
wire::Status TrainServer::Session::on_forward(const wire::Frame& f) {
  if (tail_link_) return on_forward_tail(f);
  Inputs in;
  wire::HeartbeatScope alive(ch_, std::chrono::seconds(2));
  const auto t0 = Clock::now();
  wire::BackwardMsg bm;
  std::string packet;
  double loss_v = 0;
  double codec_seconds = 0;
  wire::Status s;
  if (!wait_for_round(&s)) return s;
  s = compute::run([&] {
    take_pending_step();
    const auto d0 = Clock::now();
    wire::Status ds = decode_inputs(f, true, &in);
    codec_seconds += seconds_since(d0);
    if (!ds.ok()) return ds;
    const wire::ForwardMsg& fm = in.msg;
    const FederationGradients installed(fed_.get(), run_id_,
                                        fed_ ? (in.labels != kIgnoreLabel).sum().item<int64_t>() : 0);
    // Eagerly the loss is checked before backward; a captured step (--cuda-graph) checks it after.
    at::Tensor h, loss, h_grad;
    if (side().options.cuda_graph) {
      loss = graphed_.run(side(), in.h, in.mask, in.labels, schedule_.micro_batches, &h_grad);
    } else {
      h = in.h.to(side().part->dtype()).requires_grad_(true);
      loss = causal_lm_loss(side().part->forward(h, in.mask), in.labels);
    }
    loss_v = loss.item<double>();
    if (!std::isfinite(loss_v)) {
      return bad("the loss at step " + std::to_string(fm.step) +
                 " is not finite: training diverged (lower --lr or enable --clip)");
    }
    if (!side().options.cuda_graph) {
      (loss / static_cast<double>(schedule_.micro_batches)).backward();
      h_grad = h.grad();
    }
    const auto e0 = Clock::now();
    packet = link_->send_gradients(h_grad, static_cast<int64_t>(fm.step), fm.micro_batch);
    codec_seconds += seconds_since(e0);
    const bool last = fm.micro_batch + 1 == static_cast<uint64_t>(schedule_.micro_batches);
    bm.grad_sq_norm = last ? side().grad_sq_norm() : 0.0;
    return wire::Status::Ok();
  });
  if (!s.ok()) return fail(s);
  const wire::ForwardMsg& fm = in.msg;
  bm.step = fm.step;
  bm.micro_batch = fm.micro_batch;
  bm.loss = static_cast<float>(loss_v);
  bm.server_seconds = static_cast<float>(seconds_since(t0));
  bm.server_codec_seconds = static_cast<float>(codec_seconds);
  bm.forward_arrival_seconds = static_cast<float>(f.arrival_seconds);
  record_micro_batch(fm.packet.size(), packet.size(), static_cast<uint64_t>(in.h.numel()), bm.server_seconds);
  bm.packet = packet;
  loss_sum_ += loss_v;
  s = ch_.send({wire::MessageType::kBackward, 0, bm.encode()});
  return s.ok() ? s : dropped(s);
}

void TrainServer::Session::record_micro_batch(uint64_t fwd_packet_bytes, uint64_t bwd_packet_bytes, uint64_t elements,
                                              double seconds) {
  {
    std::lock_guard<std::mutex> lock(srv_.admit_mu_);
    Latency& l = srv_.latency_;
    for (size_t i = 0; i < std::size(Latency::kBounds); ++i) l.counts[i] += seconds <= Latency::kBounds[i];
    ++l.count;
    l.sum += seconds;
    RunStatus& rs = srv_.run_status_[id_];
    rs.fwd_packet_bytes += fwd_packet_bytes;
    rs.bwd_packet_bytes += bwd_packet_bytes;
    rs.elements += elements;
    ++rs.micro_batches;
    rs.seconds_sum += seconds;
    rs.seconds_max = std::max<double>(rs.seconds_max, seconds);
  }
  seconds_ += seconds;
  ++micro_;
}

// U-shaped split, FORWARD (no labels): layers [k, m) forward, their output to the client as
// TAIL_FORWARD. The graph waits for the client's TAIL_BACKWARD (on_tail_backward); meanwhile the
// next micro-batches' FORWARDs may come (the client's --in-flight), in order, at most the step's.
wire::Status TrainServer::Session::on_forward_tail(const wire::Frame& f) {
  Inputs in;
  TailPending p;
  wire::HeartbeatScope alive(ch_, std::chrono::seconds(2));
  const auto t0 = Clock::now();
  std::string tail_payload;
  wire::Status s;
  if (!wait_for_round(&s)) return s;
  s = compute::run([&] {
    take_pending_step();
    const auto d0 = Clock::now();
    wire::Status ds = decode_inputs(f, true, &in);
    p.codec_seconds += seconds_since(d0);
    if (!ds.ok()) return ds;
    const wire::ForwardMsg& fm = in.msg;
    if (tail_started_ >= schedule_.micro_batches) {
      return bad("FORWARD for micro-batch " + std::to_string(fm.micro_batch) + ", beyond the step's " +
                 std::to_string(schedule_.micro_batches) + " (a STEP comes first)");
    }
    if (fm.step != static_cast<uint64_t>(step_) || fm.micro_batch != static_cast<uint64_t>(tail_started_)) {
      return bad("FORWARD for step " + std::to_string(fm.step) + " micro-batch " + std::to_string(fm.micro_batch) +
                 ", but the server expects step " + std::to_string(step_) + " micro-batch " +
                 std::to_string(tail_started_));
    }
    p.h = in.h.to(side().part->dtype()).requires_grad_(true);
    // A federation weighs it by its input tokens: the server never sees which tokens have labels.
    if (fed_) p.tokens = in.mask.defined() ? in.mask.sum().item<int64_t>() : in.h.size(0) * in.h.size(1);
    const at::Tensor out = side().part->forward(p.h, in.mask);
    const auto e0 = Clock::now();
    p.sent = tail_link_->send_activations(out, static_cast<int64_t>(fm.step), fm.micro_batch, fm.sample_ids);
    p.codec_seconds += seconds_since(e0);
    wire::BackwardMsg tm;
    tm.step = fm.step;
    tm.micro_batch = fm.micro_batch;
    tm.forward_arrival_seconds = static_cast<float>(f.arrival_seconds);
    tm.packet = p.sent.packet;
    tail_payload = tm.encode();
    return wire::Status::Ok();
  });
  if (!s.ok()) return fail(s);
  p.seconds = seconds_since(t0);
  p.forward_arrival_seconds = f.arrival_seconds;
  p.step = in.msg.step, p.micro_batch = in.msg.micro_batch, p.forward_packet_bytes = in.msg.packet.size();
  ++tail_started_;
  tail_pending_.push_back(std::move(p));
  s = ch_.send({wire::MessageType::kTailForward, 0, std::move(tail_payload)});
  return s.ok() ? s : dropped(s);
}

// U-shaped split, TAIL_BACKWARD: the client's gradient at m goes back through the oldest waiting
// micro-batch's layers (and into the tail link's gates); the gradient at k goes back as BACKWARD.
// The server's time excludes the wait for the client's tail.
wire::Status TrainServer::Session::on_tail_backward(const wire::Frame& f) {
  if (tail_pending_.empty()) return fail(bad("TAIL_BACKWARD with no micro-batch waiting for it"));
  wire::HeartbeatScope alive(ch_, std::chrono::seconds(2));
  const auto t0 = Clock::now();
  TailPending p = std::move(tail_pending_.front());
  tail_pending_.pop_front();
  wire::BackwardMsg tb, bm;
  std::string packet;
  wire::Status s = wire::BackwardMsg::decode(f.payload, &tb);
  if (s.ok() && (tb.step != p.step || tb.micro_batch != p.micro_batch))
    s = bad("TAIL_BACKWARD for another step or micro-batch");
  if (s.ok()) {
    s = compute::run([&] {
      const auto d0 = Clock::now();
      at::Tensor dh;
      try {
        dh = tail_link_->receive_gradients(tb.packet, nullptr, side().device(), p.sent.value.numel());
      } catch (const Error& e) {
        return bad(e.what());
      }
      if (dh.sizes() != p.sent.value.sizes()) return bad("TAIL_BACKWARD gradient shape differs from the activation's");
      p.codec_seconds += seconds_since(d0);
      const FederationGradients installed(fed_.get(), run_id_, p.tokens);
      tail_link_->backward(p.sent.value, dh, static_cast<int64_t>(p.step), schedule_.micro_batches, nullptr);
      const auto e0 = Clock::now();
      packet = link_->send_gradients(p.h.grad(), static_cast<int64_t>(p.step), p.micro_batch);
      p.codec_seconds += seconds_since(e0);
      const bool last = p.micro_batch + 1 == static_cast<uint64_t>(schedule_.micro_batches);
      bm.grad_sq_norm = last ? side().grad_sq_norm() : 0.0;
      return wire::Status::Ok();
    });
  }
  if (!s.ok()) return fail(s);
  const double seconds = p.seconds + seconds_since(t0);
  bm.step = p.step;
  bm.micro_batch = p.micro_batch;
  bm.server_seconds = static_cast<float>(seconds);
  bm.server_codec_seconds = static_cast<float>(p.codec_seconds);
  bm.forward_arrival_seconds = static_cast<float>(p.forward_arrival_seconds);
  record_micro_batch(p.forward_packet_bytes + tb.packet.size(), packet.size() + p.sent.packet.size(),
                     static_cast<uint64_t>(p.h.numel()), seconds);
  bm.packet = packet;
  s = ch_.send({wire::MessageType::kBackward, 0, bm.encode()});
  return s.ok() ? s : dropped(s);
}

wire::Status TrainServer::Session::no_tail_pending(const char* what) {
  if (tail_pending_.empty()) return wire::Status::Ok();
  return bad(std::string(what) + " while " + std::to_string(tail_pending_.size()) +
             " micro-batch(es) of the step still wait for their TAIL_BACKWARD");
}

// EVAL: per row NLL, labelled tokens and argmax hits, without gradients.
wire::Status TrainServer::Session::on_eval(const wire::Frame& f) {
  Inputs in;
  wire::HeartbeatScope alive(ch_, std::chrono::seconds(2));
  wire::EvalResultMsg res;
  std::string payload;
  wire::Status s;
  if (!wait_for_round(&s)) return s;
  s = compute::run([&] {
    take_pending_step();
    wire::Status ds = decode_inputs(f, false, &in);
    if (!ds.ok()) return ds;
    at::NoGradGuard no_grad;
    const at::Tensor out = side().part->forward(in.h.to(side().part->dtype()), in.mask);
    if (tail_link_) {  // U-shaped: the client scores
      wire::BackwardMsg tm;
      tm.step = in.msg.step;
      const std::string packet = tail_link_->encode_eval(out);
      tm.packet = packet;
      payload = tm.encode();
      return wire::Status::Ok();
    }
    for (const RowScore& r : score_rows(out, in.labels)) res.rows.push_back({r.nll_sum, r.tokens, r.correct});
    res.step = in.msg.step;
    payload = res.encode();
    return wire::Status::Ok();
  });
  if (!s.ok()) return fail(s);
  s = ch_.send({tail_link_ ? wire::MessageType::kTailForward : wire::MessageType::kEval, 0, std::move(payload)});
  return s.ok() ? s : dropped(s);
}

wire::Status TrainServer::Session::on_control(const wire::Frame& f) {
  wire::ControlMsg cm;
  wire::Status s = wire::ControlMsg::decode(f.payload, &cm);
  if (!s.ok()) return fail(s);
  const nlohmann::json j = nlohmann::json::parse(cm.json, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return fail(bad("CONTROL body is not a JSON object"));
  try {
    if (cm.kind != wire::ControlKind::kBitSync) {
      if (s = no_tail_pending("CONTROL"); !s.ok()) return fail(s);
    }
    switch (cm.kind) {
      case wire::ControlKind::kBitSync:
        return on_bit_sync(j);
      case wire::ControlKind::kStep:
        return on_step(j);
      case wire::ControlKind::kCheckpoint:
        return on_checkpoint(j);
      case wire::ControlKind::kFedAvg:
        return on_fed_avg(j, cm.blob);
      case wire::ControlKind::kSchedule:
      case wire::ControlKind::kResume:
      case wire::ControlKind::kStop:
        break;
    }
  } catch (const nlohmann::json::exception& e) {
    return fail(bad(std::string("CONTROL: ") + e.what()));
  }
  return fail(bad("CONTROL kind " + std::to_string(static_cast<int>(cm.kind)) + " is not expected during training"));
}

wire::Status TrainServer::Session::on_bit_sync(const nlohmann::json& j) {
  const auto budget = [&](const char* key, double* out) {
    if (!j.contains(key)) return false;
    *out = j.at(key).get<double>();
    return true;
  };
  double b = 0;
  if (budget("budget", &b)) {
    if (!(b >= 1 && b <= 8)) return fail(bad("BIT_SYNC budget " + std::to_string(b) + " outside [1, 8]"));
    link_->set_backward_budget(b);
  }
  if (budget("tail_fwd_budget", &b)) {
    if (!tail_link_ || !tail_link_->forward_budget_auto())
      return fail(bad("BIT_SYNC with a tail budget, but this run's tail codec has no budget=auto"));
    if (!(b >= 1 && b <= 8)) return fail(bad("BIT_SYNC tail budget " + std::to_string(b) + " outside [1, 8]"));
    tail_link_->set_auto_budgets(tail_link_->forward_spec().within_budget_range(b), tail_link_->backward_target());
  }
  return wire::Status::Ok();
}

// STEP: clip by the client's global coefficient and step (taken when the next message needs the weights);
// one line in the run's server log.
wire::Status TrainServer::Session::on_step(const nlohmann::json& j) {
  int64_t step = 0;
  if (wire::Status s = read_step(j, &step); !s.ok()) return fail(s);
  const double lr = j.at("lr").get<double>(), coef = j.at("coef").get<double>();
  if (step != step_)
    return fail(bad("STEP " + std::to_string(step) + " but the server is at step " + std::to_string(step_)));
  if (!(coef > 0 && coef <= 1) || !(lr >= 0)) return fail(bad("STEP with lr or clip coefficient out of range"));
  if (fed_) fed_->submit_step(run_id_, lr, coef);
  pending_step_ = {lr, coef};
  nlohmann::json line{{"step", step},
                      {"lr", lr},
                      {"coef", coef},
                      {"server_seconds", seconds_},
                      {"bwd_budget", link_->backward_budget()}};
  if (!tail_link_) line["loss"] = micro_ ? loss_sum_ / micro_ : 0.0;  // U-shaped: the loss stays on the client
  log_->write(line);
  loss_sum_ = seconds_ = 0;
  micro_ = 0;
  tail_started_ = 0;
  ++step_;
  {
    std::lock_guard<std::mutex> lock(srv_.admit_mu_);
    RunStatus& rs = srv_.run_status_[id_];
    rs.step = step_;
    rs.bytes_in = ch_.accounting().bytes_received();
    rs.bytes_out = ch_.accounting().bytes_sent();
  }
  ++srv_.steps_served_;
  return wire::Status::Ok();
}

bool TrainServer::Session::wait_for_round(wire::Status* s) {
  if (!fed_) return true;
  *s = fed_->wait_step(run_id_, cfg_.idle_timeout, srv_.stopping_);
  if (s->ok()) return true;
  *s = s->code == wire::ErrorCode::kShutdown ? stop() : fail(*s);
  return false;
}

void TrainServer::Session::take_pending_step() {
  if (fed_) fed_->take_pending_steps();  // the shared side's completed rounds (this member's STEP in one)
  if (!pending_step_) return;
  if (!fed_) {
    side().step(pending_step_->first, pending_step_->second);
    side().zero_grad();
  }
  pending_step_.reset();
  if (tail_link_) {  // the gates of the activations this side sends at the tail split: this run's own
    tail_link_->end_step(step_ - 1);
    tail_link_->begin_step();
  }
}

// CHECKPOINT: the same step as the client's; the final one sends this side's options and LoRA.
wire::Status TrainServer::Session::on_checkpoint(const nlohmann::json& j) {
  int64_t step = 0;
  if (wire::Status s = read_step(j, &step); !s.ok()) return fail(s);
  const bool final = j.value("final", false);
  if (step != step_)
    return fail(
        bad("CHECKPOINT at step " + std::to_string(step) + " but the server is at step " + std::to_string(step_)));
  std::string blob;
  wire::Status s;
  if (!wait_for_round(&s)) return s;
  compute::run([&] {
    take_pending_step();
    save_side_checkpoint(root_, step, side(), *link_, {{"step", step}, {"run_id", run_id_}}, cfg_.keep_checkpoints,
                         tail_link_.get());
    if (final && !side().options.full) blob = safetensors_bytes(side().state(), {{"format", "pt"}});
  });
  const nlohmann::json reply{{"step", step}, {"ok", true}, {"side", side().options.to_json()}};
  s = detail::send_control(ch_, wire::ControlKind::kCheckpoint, reply, std::move(blob));
  return s.ok() ? s : dropped(s);
}

wire::Status TrainServer::Session::on_fed_avg(const nlohmann::json& j, const std::string& blob) {
  if (!fed_) return fail(bad("FED_AVG from a run that is in no federation"));
  int64_t step = 0, tokens = 0;
  if (wire::Status s = read_step(j, &step); !s.ok()) return fail(s);
  try {
    tokens = json_int<int64_t>(j, "tokens");
  } catch (const Error& e) {
    return fail(bad(std::string("FED_AVG: ") + e.what()));
  }
  if (step != step_ || tokens < 0)
    return fail(bad("FED_AVG at step " + std::to_string(step) + " with " + std::to_string(tokens) +
                    " tokens, but the server is at step " + std::to_string(step_)));
  std::map<std::string, at::Tensor> tensors;
  try {
    tensors = safetensors_from_bytes(blob, "FED_AVG of run " + run_id_);
  } catch (const Error& e) {
    return fail(bad(e.what()));
  }
  wire::HeartbeatScope alive(ch_, std::chrono::seconds(2));
  std::shared_ptr<const std::string> averaged;
  wire::Status s = fed_->average(run_id_, std::move(tensors), tokens, cfg_.idle_timeout, srv_.stopping_, &averaged);
  if (s.code == wire::ErrorCode::kShutdown) return stop();
  if (!s.ok()) return fail(s);
  s = detail::send_control(ch_, wire::ControlKind::kFedAvg, {{"step", step}, {"members", fed_->members()}}, *averaged);
  return s.ok() ? s : dropped(s);
}

wire::Status TrainServer::Session::stop() {
  spdlog::info("session {}: run {} stopped at step {}: the server is stopping", id_, run_id_, step_);
  wire::Status s = detail::send_control(ch_, wire::ControlKind::kStop, {{"step", step_}});
  while (s.ok()) {
    wire::Frame f;
    s = ch_.receive(&f, cfg_.handshake_timeout);
    if (!s.ok()) break;
    if (f.type == wire::MessageType::kBye) return on_bye();
    if (f.type != wire::MessageType::kControl) continue;  // FORWARD / EVAL already on their way: not answered
    wire::ControlMsg cm;
    s = wire::ControlMsg::decode(f.payload, &cm);
    if (!s.ok()) return fail(s);
    if (cm.kind != wire::ControlKind::kCheckpoint) return fail(bad("only CHECKPOINT or BYE after STOP"));
    try {
      s = on_checkpoint(nlohmann::json::parse(cm.json));
    } catch (const nlohmann::json::exception& e) {
      return fail(bad(std::string("CONTROL: ") + e.what()));
    }
  }
  return dropped(s);
}

wire::Status TrainServer::Session::on_bye() {
  log_->write(
      {{"session",
        {{"bytes_sent", ch_.accounting().bytes_sent()}, {"bytes_received", ch_.accounting().bytes_received()}}}});
  spdlog::info("session {}: run {} ended by the client after step {}", id_, run_id_, step_);
  if (side().part && side().device().is_cuda()) {
    spdlog::info("session {}: peak GPU memory of this process on {}: {:.2f} GB", id_, side().device().str(),
                 static_cast<double>(peak_memory_bytes(side().device())) / 1e9);
  }
  return wire::Status::Ok();
}

}  // namespace amaq::train
