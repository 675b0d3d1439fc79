// The client side of a run: owns the data, the schedule, the run directory; drives the server
// (see session.h for the protocol). ClientTrainer::run is the outer loop; Run holds the stages.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <optional>
#include <random>
#include <thread>

#include "core/compute.h"
#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/hash.h"
#include "core/json.h"
#include "model/part.h"
#include "quant/link.h"
#include "train/auto_budget.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/eval.h"
#include "train/report.h"
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

// A failure of the link (worth reconnecting) rather than a refusal or a protocol violation.
bool is_link_failure(const wire::Status& s) {
  return s.code == wire::ErrorCode::kClosed || s.code == wire::ErrorCode::kTimeout ||
         s.code == wire::ErrorCode::kTruncated;
}
// Failing to set a session up for one of these reasons is worth another try.
bool is_connect_failure(const wire::Status& s) {
  return is_link_failure(s) || s.code == wire::ErrorCode::kTls || s.code == wire::ErrorCode::kBusy;
}

[[noreturn]] void refused(const wire::Status& s) {
  std::string hint = "check that both sides run the same model, split and codecs";
  if (s.code == wire::ErrorCode::kBadAuth) hint = "use the token file the server was started with";
  if (s.code == wire::ErrorCode::kResume) hint = "start a new run directory, or resume from a step the server has";
  if (s.code == wire::ErrorCode::kFederation)
    hint = "give every member of the federation the same --fed-clients, and start all of them";
  if (s.code == wire::ErrorCode::kInternal)
    hint = "the server's side failed to set up: fix what the message names there";
  throw Error(std::string("server refused the run: ") + s.message + " (" + wire::error_name(s.code) + ")", hint);
}

// A batch's labels and mask as the raw bytes FORWARD / EVAL carry, kept alive while the message
// that views them is encoded.
struct BatchBytes {
  wire::LabelType type;
  at::Tensor labels, mask;
  /// t = kNone (a U-shaped split): the labels stay here.
  BatchBytes(const Batch& b, wire::LabelType t)
      : type(t),
        labels(t == wire::LabelType::kNone ? at::Tensor() : b.labels.to(detail::label_scalar(t)).contiguous()),
        mask(b.mask.to(at::kByte).contiguous()) {}
  wire::ForwardMsg message(int64_t step, int64_t micro_batch, std::string_view packet) const {
    wire::ForwardMsg fm;
    fm.step = static_cast<uint64_t>(step);
    fm.micro_batch = static_cast<uint32_t>(micro_batch);
    fm.batch = static_cast<uint32_t>(mask.size(0));
    fm.seq = static_cast<uint32_t>(mask.size(1));
    fm.label_type = type;
    if (labels.defined()) fm.labels = std::string_view(static_cast<const char*>(labels.data_ptr()), labels.nbytes());
    fm.mask = std::string_view(static_cast<const char*>(mask.data_ptr()), mask.nbytes());
    fm.packet = packet;
    return fm;
  }
};

std::vector<int64_t> range(int64_t from, int64_t to) {
  std::vector<int64_t> idx;
  for (int64_t i = from; i < to; ++i) idx.push_back(i);
  return idx;
}

}  // namespace

// One run of the client: what stays for the whole run (directory, model, data, log) and what a
// checkpoint restores (the side, its link, the step and the position in the data).
class ClientTrainer::Run {
 public:
  explicit Run(const ClientConfig& c);
  /// A fresh state, or the newest checkpoint's.
  void restore(bool resume);
  /// Connects, shakes hands and agrees with the server on the run and its step.
  wire::Status connect(const Connector& connect, std::unique_ptr<wire::Channel>* ch);
  /// Steps (with evaluations and checkpoints) until the last step, then the final evaluation.
  wire::Status train(wire::Channel& ch);
  /// After a successful train(): says BYE, writes the summary and the learned map.
  RunResult finish(wire::Channel& ch);
  bool has_checkpoint() const { return !list_checkpoints(ckpt_root_).empty(); }
  /// The server is stopping (CONTROL kStop at a step boundary): checkpoint this step on both sides
  /// when that is exact, say BYE, and throw the error that tells the user how to go on.
  [[noreturn]] void server_stopped(wire::Channel& ch, const wire::Status& why);
  int64_t step() const { return step_; }

 private:
  void open_run_dir();
  wire::Status train_step(wire::Channel& ch, StepRecord* rec);
  // A micro-batch whose activations are on their way and whose gradient has not come back: the
  // value in the graph the gradient goes into (its packet is already on the wire).
  struct InFlight {
    int64_t m = 0;
    at::Tensor value;              // (B, T, C)
    uint64_t forward_payload = 0;  // bytes of its FORWARD frame's payload
    at::Tensor labels, mask;       // U-shaped split: the tail computes the loss here
  };
  wire::Status send_micro_batch(wire::Channel& ch, int64_t m, StepRecord* rec, InFlight* in);
  /// Its BACKWARD `f` (the gradient at the split) into the client's graph.
  wire::Status finish_micro_batch(const wire::Frame& f, InFlight& in, StepRecord* rec, double* server_sq_norm);
  /// U-shaped split: its TAIL_FORWARD `f` through the tail and the loss, the gradient back.
  wire::Status run_tail(wire::Channel& ch, const wire::Frame& f, InFlight& in, StepRecord* rec);
  /// The label type FORWARD and EVAL carry: none when the labels stay here (U-shaped split).
  wire::LabelType sent_label_type() const { return tail_link_ ? wire::LabelType::kNone : label_type_; }
  bool needs_sample_ids() const { return link_->needs_sample_ids() || (tail_link_ && tail_link_->needs_sample_ids()); }
  void log_step(StepRecord* rec, const wire::Channel& ch, const wire::Accounting& before, Clock::time_point t_step,
                Progress* progress);
  wire::Status evaluate(wire::Channel& ch);
  /// U-shaped split: the server's TAIL_FORWARD for an EVAL batch, scored by the tail here.
  wire::Status score_tail(const wire::Frame& f, const Batch& b, wire::EvalResultMsg* out);
  wire::Status score_remote(wire::Channel& ch, const Dataset& d, int64_t limit, std::vector<RowScore>* out);
  wire::Status checkpoint(wire::Channel& ch, bool final);
  /// --federation: this side's trained tensors averaged with the other members' through the server.
  wire::Status fed_average(wire::Channel& ch);

  const ClientConfig& c_;
  const std::string ckpt_root_, run_file_;
  std::string run_id_;
  ModelConfig model_;
  CheckpointReader weights_;
  std::string fingerprint_;
  std::unique_ptr<Tokenizer> tok_;
  Dataset train_, val_;
  std::optional<Sampler> sampler_;
  int64_t pad_id_ = 0;
  wire::LabelType label_type_;
  std::unique_ptr<JsonlLog> metrics_;
  nlohmann::json final_eval_;
  // What a checkpoint restores.
  Side side_;
  std::unique_ptr<quant::Link> link_;
  std::unique_ptr<quant::Link> tail_link_;  // U-shaped split: this side receives the activations at the tail split
  // budget=auto: the budgets chosen from the link and compute measured this session, and this step's measurements.
  std::optional<AutoBudget> auto_budget_;
  // U-shaped split, budget=auto: the budget chosen for the server's gates at M, and the one it was
  // last told on this connection (BIT_SYNC `tail_fwd_budget`).
  std::optional<double> tail_fwd_budget_, tail_fwd_budget_sent_;
  LinkSample link_sample_;
  int64_t step_ = 0;      // optimizer steps completed
  int64_t position_ = 0;  // training examples consumed
  int64_t resume_step_ = -1;
  int64_t fed_tokens_ = 0;  // trained on since the last federated average (this session)
};

ClientTrainer::ClientTrainer(ClientConfig cfg) : cfg_(std::move(cfg)) {}
ClientTrainer::~ClientTrainer() = default;

RunResult ClientTrainer::run(const Connector& connect) {
  Run run(cfg_);
  int64_t attempts_left = cfg_.retries;
  bool resume = cfg_.resume;
  const auto busy_deadline = Clock::now() + std::chrono::duration<double>(cfg_.busy_wait);
  double busy_pause = 1;
  while (true) {
    run.restore(resume);
    std::unique_ptr<wire::Channel> ch;
    wire::Status s = run.connect(connect, &ch);
    if (s.code == wire::ErrorCode::kBusy && Clock::now() < busy_deadline) {
      // Load, not failure: asked again with back-off (1, 2, 4 ... 30 s, jittered) for --busy-wait seconds.
      const double pause = busy_pause * (0.75 + 0.5 * static_cast<double>(std::random_device{}() % 1000) / 1000.0);
      spdlog::warn("{}; asking again in {:.1f} s", s.message, pause);
      std::this_thread::sleep_for(std::chrono::duration<double>(pause));
      busy_pause = std::min(30.0, busy_pause * 2);
      resume = run.has_checkpoint();
      continue;
    }
    if (!s.ok()) {
      if (!is_connect_failure(s)) refused(s);
      if (attempts_left-- <= 0)
        throw Error("cannot reach the server: " + s.message, "check --connect, TLS files and that the server runs");
      spdlog::warn("connecting failed: {}; retrying in 2 s ({} attempts left)", s.message, attempts_left + 1);
      std::this_thread::sleep_for(std::chrono::seconds(2));
      resume = run.has_checkpoint();
      continue;
    }
    s = run.train(*ch);
    if (s.ok()) return run.finish(*ch);
    if (s.code == wire::ErrorCode::kShutdown) run.server_stopped(*ch, s);
    ch->close();
    if (!is_link_failure(s)) refused(s);
    if (attempts_left-- <= 0)
      throw Error("lost the server at step " + std::to_string(run.step()) + ": " + s.message, "rerun with --resume");
    spdlog::warn(
        "lost the server at step {}: {}; reconnecting and resuming from the last checkpoint ({} attempts left)",
        run.step(), s.message, attempts_left + 1);
    std::this_thread::sleep_for(std::chrono::seconds(1));
    resume = run.has_checkpoint();
    if (!resume)
      throw Error("lost the server before the first checkpoint: " + s.message,
                  "start the run again (set --checkpoint-every)");
  }
}

ClientTrainer::Run::Run(const ClientConfig& c)
    : c_(c),
      ckpt_root_(join_path(c.run_dir, "checkpoints")),
      run_file_(join_path(c.run_dir, "run.json")),
      model_(ModelConfig::load(c.model)),
      weights_(c.model),
      fingerprint_(model_fingerprint(model_, weights_)),
      tok_(load_tokenizer(c.tokenizer == "auto" ? c.model : c.tokenizer)),
      label_type_(wire::narrowest_label_type(model_.vocab_size)) {
  quant::Link::validate(c.fwd_codec, c.bwd_codec);
  Schedule::from_json(c_.schedule.to_json());  // validates
  if (c_.batch < 1) throw Error("--batch must be at least 1", "sequences per micro-batch, e.g. --batch 8");
  if (!c_.federation.empty()) {
    if (!valid_federation_name(c_.federation))
      throw Error("--federation '" + c_.federation + "' is not a federation name",
                  "use 1-64 characters of A-Z a-z 0-9 . _ -");
    if (c_.fed_every < 1 || c_.fed_clients < 1 || c_.fed_clients > 1024)
      throw Error("--fed-every must be at least 1 and --fed-clients in [1, 1024]",
                  "e.g. --fed-every 10 --fed-clients 2");
    if (c_.side.full)
      throw Error("--federation averages the client sides' LoRA; this client trains full weights (--full)",
                  "train LoRA on the client side, or leave the federation");
  }
  if (c_.tail_split != 0) {
    check_tail_split(model_, c_.split, c_.tail_split);
    check_tail_codecs(c_.fwd_codec, c_.bwd_codec, c_.tail_fwd_codec, c_.tail_bwd_codec);
  }
  if (c_.seq_len > model_.max_position_embeddings && !c_.beyond_positions) {
    throw Error("--seq-len " + std::to_string(c_.seq_len) + " is longer than the model's max_position_embeddings (" +
                    std::to_string(model_.max_position_embeddings) + ")",
                "use a shorter --seq-len, or pass --beyond-positions for a model that extrapolates");
  }
  if (tok_->vocab_size() > model_.vocab_size) {
    throw Error("tokenizer '" + tok_->name() + "' has " + std::to_string(tok_->vocab_size()) +
                    " ids but the model only " + std::to_string(model_.vocab_size),
                "use the model's own tokenizer");
  }
  train_ = Dataset::load(c.data, *tok_, c.seq_len);
  if (!c.val_data.empty())
    val_ = Dataset::load(c.val_data, *tok_, c.seq_len);
  else if (c.val_fraction > 0)
    val_ = train_.split_off(c.val_fraction, c.schedule.seed);
  sampler_.emplace(static_cast<int64_t>(train_.examples.size()), c.schedule.seed);
  pad_id_ = tok_->eos_id() >= 0 ? tok_->eos_id() : 0;
  // Only now, with model and data loaded, does the run directory record a run.
  open_run_dir();
  metrics_ = std::make_unique<JsonlLog>(join_path(c.run_dir, "metrics.jsonl"));
}

// The run directory: a new run, or the one being resumed; its resolved configuration.
void ClientTrainer::Run::open_run_dir() {
  remove_stale_temps(ckpt_root_);
  if (c_.resume) {
    if (!file_exists(run_file_))
      throw Error(c_.run_dir + " holds no run to resume (no run.json)", "drop --resume to start a new run");
    run_id_ = parse_run_file(read_file(run_file_), run_file_);
  } else {
    if (has_checkpoint()) {
      throw Error(c_.run_dir + " already holds a run", "pass --resume to continue it, or choose another --run-dir");
    }
    make_dirs(c_.run_dir);
    // A run that stopped before its first checkpoint left nothing to resume: start over in the same
    // directory, keeping its log beside the new one.
    const std::string log = join_path(c_.run_dir, "metrics.jsonl");
    if (file_exists(run_file_) && file_exists(log)) {
      std::string old_id;
      try {
        old_id = parse_run_file(read_file(run_file_), run_file_);
      } catch (const Error&) {
        old_id = random_hex(8);  // the log is kept all the same
      }
      rename_path(log, join_path(c_.run_dir, "metrics." + old_id + ".jsonl"));
      spdlog::info(
          "{}: the run {} stopped before its first checkpoint; starting a new one (its log is kept as "
          "metrics.{}.jsonl)",
          c_.run_dir, old_id, old_id);
    }
    run_id_ = random_hex(16);
    write_file_atomic(run_file_, nlohmann::json{{"run_id", run_id_},
                                                {"model", c_.model},
                                                {"split", c_.split},
                                                {"side", c_.side.to_json()},
                                                {"fwd_codec", c_.fwd_codec.to_string()},
                                                {"bwd_codec", c_.bwd_codec.to_string()},
                                                {"tail_split", c_.tail_split},
                                                {"tail_fwd_codec", c_.tail_fwd_codec.to_string()},
                                                {"tail_bwd_codec", c_.tail_bwd_codec.to_string()}}
                                         .dump(2) +
                                     "\n");
  }
  std::string cfg_text;
  std::vector<std::vector<std::string>> rows{{"option", "value"}};
  for (const auto& [k, v] : c_.resolved) {
    cfg_text += k + " = " + nlohmann::json(v).dump() + "\n";
    rows.push_back({k, v});
  }
  write_file_atomic(join_path(c_.run_dir, "config.toml"),
                    "# resolved configuration of run " + run_id_ + "\n" + cfg_text);
  if (!c_.quiet && !c_.resolved.empty()) std::fprintf(stderr, "%s", format_table(rows).c_str());
}

void ClientTrainer::Run::restore(bool resume) {
  step_ = position_ = fed_tokens_ = 0;
  resume_step_ = -1;
  const auto have = list_checkpoints(ckpt_root_);
  if (resume && have.empty()) {
    throw Error(c_.run_dir + " has no checkpoint to resume from",
                "the run stopped before its first checkpoint: start it again");
  }
  auto fresh = [&] {
    side_ = Side::build(model_, weights_, SideRole::kClient, c_.split, c_.side, c_.schedule.seed,
                        c_.schedule.weight_decay, nullptr, c_.tail_split);
    link_ = std::make_unique<quant::Link>(quant::LinkSide::kClient, c_.fwd_codec, c_.bwd_codec, model_.hidden_size,
                                          c_.schedule.gate_lr);
    // At the tail split this side receives the activations: the link's receiving end.
    if (c_.tail_split != 0) {
      tail_link_ = std::make_unique<quant::Link>(quant::LinkSide::kServer, c_.tail_fwd_codec, c_.tail_bwd_codec,
                                                 model_.hidden_size, c_.schedule.gate_lr);
    }
  };
  if (!resume) return compute::run(fresh);
  // The newest checkpoint that loads; a damaged one is skipped with its reason.
  std::string skipped;
  for (auto it = have.rbegin(); it != have.rend(); ++it) {
    const std::string dir = checkpoint_path(ckpt_root_, *it);
    try {
      compute::run([&] {
        fresh();
        const nlohmann::json state = load_side_checkpoint(dir, &side_, *link_, tail_link_.get());
        if (!state.contains("position") || !state["position"].is_number_integer()) {
          throw Error(join_path(dir, "state.json") + " has no integer \"position\"",
                      "resume from an earlier checkpoint (--resume skips damaged ones)");
        }
        step_ = json_int<int64_t>(state, "step");
        position_ = json_int<int64_t>(state, "position");
      });
      resume_step_ = *it;
      return;
    } catch (const std::exception& e) {
      const auto* c10 = dynamic_cast<const c10::Error*>(&e);
      const std::string why = c10 ? c10->what_without_backtrace() : e.what();
      spdlog::warn("skipping the checkpoint at step {}: {}", *it, why);
      skipped += "\n  step " + std::to_string(*it) + ": " + why;
    }
  }
  throw Error("no checkpoint in " + ckpt_root_ + " can be resumed from:" + skipped,
              "start the run again in a new --run-dir");
}

wire::Status ClientTrainer::Run::connect(const Connector& connect, std::unique_ptr<wire::Channel>* ch) {
  wire::Status s = connect(ch);
  wire::HelloAck ack;
  if (s.ok()) {
    wire::Hello hello;
    hello.model_fingerprint = fingerprint_;
    hello.split = c_.split;
    hello.fwd_codec = c_.fwd_codec.to_string();
    hello.bwd_codec = c_.bwd_codec.to_string();
    hello.resume_step = resume_step_;
    if (c_.tail_split != 0) {
      hello.tail_split = c_.tail_split;
      hello.tail_fwd_codec = c_.tail_fwd_codec.to_string();
      hello.tail_bwd_codec = c_.tail_bwd_codec.to_string();
    }
    s = wire::client_handshake(**ch, hello, c_.token, std::chrono::seconds(30), &ack);
  }
  if (s.ok()) {
    s = detail::send_control(
        **ch, wire::ControlKind::kSchedule,
        ScheduleRequest{run_id_, resume_step_, c_.batch, c_.seq_len, c_.schedule, c_.federation, c_.fed_clients}
            .to_json());
  }
  wire::Frame f;
  nlohmann::json reply;
  if (s.ok()) s = detail::expect(**ch, wire::MessageType::kControl, std::chrono::minutes(2), &f);
  if (s.ok()) s = detail::parse_control(f, wire::ControlKind::kSchedule, &reply);
  if (s.ok() && !c_.quiet) {
    spdlog::info("run {}: {} at step {} of {}, session {}", run_id_, resume_step_ >= 0 ? "resumed" : "started", step_,
                 c_.schedule.steps, ack.session_id);
  }
  return s;
}

wire::Status ClientTrainer::Run::train(wire::Channel& ch) {
  Progress progress(step_, c_.schedule.steps, c_.progress_bar);
  if (link_->forward_budget_auto() || link_->backward_budget_auto()) {
    // Measured again on every connection: a reconnect may take another path. A U-shaped split's
    // codecs at M share their direction's budget (check_tail_codecs): each keeps its own range.
    const quant::CodecSpec &f = link_->forward_spec(), &b = link_->backward_spec();
    AutoBudgetOptions o;
    o.fwd_floor = f.budget_floor, o.fwd_max = f.bits_max;
    o.bwd_floor = b.budget_floor, o.bwd_max = b.bits_max;
    if (tail_link_) {
      const quant::CodecSpec &tf = tail_link_->forward_spec(), &tb = tail_link_->backward_spec();
      o.fwd_floor = std::min(o.fwd_floor, tb.budget_floor), o.fwd_max = std::max<double>(o.fwd_max, tb.bits_max);
      o.bwd_floor = std::min(o.bwd_floor, tf.budget_floor), o.bwd_max = std::max<double>(o.bwd_max, tf.bits_max);
    }
    auto_budget_.emplace(o, link_->forward_target(), link_->backward_target());
    link_sample_ = {};
    tail_fwd_budget_.reset(), tail_fwd_budget_sent_.reset();  // the server keeps its own until told
  }
  const int64_t last = c_.stop_after >= 0 ? std::min<int64_t>(c_.stop_after, c_.schedule.steps) : c_.schedule.steps;
  wire::Status s;
  while (s.ok() && step_ < last) {
    StepRecord rec;
    const auto t_step = Clock::now();
    const wire::Accounting before = ch.accounting();
    s = train_step(ch, &rec);
    if (!s.ok()) break;
    log_step(&rec, ch, before, t_step, &progress);
    const bool done = step_ == c_.schedule.steps;
    fed_tokens_ += rec.tokens;
    if (!c_.federation.empty() && (done || step_ % c_.fed_every == 0)) s = fed_average(ch);
    if (s.ok() && c_.eval_every > 0 && step_ % c_.eval_every == 0 && !done) s = evaluate(ch);
    if (s.ok() && (done || step_ == last || (c_.checkpoint_every > 0 && step_ % c_.checkpoint_every == 0)))
      s = checkpoint(ch, done);
  }
  if (!c_.quiet) progress.finish();
  if (s.ok() && step_ == c_.schedule.steps) s = evaluate(ch);
  return s;
}

// One optimizer step: the micro-batches through the server, then both sides step with the global
// clip coefficient.
wire::Status ClientTrainer::Run::train_step(wire::Channel& ch, StepRecord* rec) {
  const int64_t step = step_;
  rec->step = step;
  rec->lr = c_.schedule.lr_at(step);
  {
    nlohmann::json sync{{"step", step}};
    if (auto budget = link_->backward_budget_to_sync(step)) sync["budget"] = *budget;
    if (tail_fwd_budget_ && tail_fwd_budget_ != tail_fwd_budget_sent_) {
      sync["tail_fwd_budget"] = *tail_fwd_budget_;  // the server's gates at M
      tail_fwd_budget_sent_ = tail_fwd_budget_;
    }
    if (sync.size() > 1) {
      wire::Status s = detail::send_control(ch, wire::ControlKind::kBitSync, sync);
      if (!s.ok()) return s;
    }
  }
  if (tail_link_) {
    tail_link_->follow_backward_schedule(step);
    const double b = tail_link_->backward_spec().codec == quant::CodecId::kAmaq
                         ? tail_link_->backward_budget()
                         : tail_link_->backward_spec().nominal_bits();
    rec->tail_bwd_bits = BitsStats{b, b, b};
  }
  const auto t_begin = Clock::now();
  compute::run([&] {
    side_.zero_grad();
    link_->begin_step();
  });
  rec->client_seconds += seconds_since(t_begin);
  // Micro-batches in flight: before waiting for micro-batch i's gradient, the activations of up to
  // `in_flight` - 1 more are computed and sent, so they travel and the server computes while this
  // side computes the next or its backward. Gradients enter the graph in order: the accumulation
  // is the serial run's (in_flight = 1). One thread does the channel's I/O, as before.
  // U-shaped: each micro-batch's TAIL_FORWARD, then its BACKWARD, each kind in order; whichever
  // comes first is computed first (the tail's parameters and the head's are apart, so each sees its
  // micro-batches in the serial order).
  const int64_t M = c_.schedule.micro_batches, window = std::max<int64_t>(1, c_.in_flight);
  double server_sq = 0;
  std::deque<InFlight> pending;  // sent, their BACKWARD not yet in; the front is micro-batch `done`
  int64_t next = 0, tailed = 0;  // micro-batches sent; U-shaped: those whose TAIL_FORWARD came
  for (int64_t done = 0; done < M;) {
    while (next < M && next - done < window) {
      pending.emplace_back();
      wire::Status s = send_micro_batch(ch, next++, rec, &pending.back());
      if (!s.ok()) return s;
    }
    const bool tail_due = tail_link_ && tailed < next, backward_due = !tail_link_ || tailed > done;
    wire::Frame f;
    wire::Status s = detail::expect_either(
        ch, backward_due ? wire::MessageType::kBackward : wire::MessageType::kTailForward,
        tail_due ? wire::MessageType::kTailForward : wire::MessageType::kBackward, std::chrono::minutes(10), &f);
    if (!s.ok()) return s;
    if (f.type == wire::MessageType::kTailForward) {
      s = run_tail(ch, f, pending[tailed - done], rec);
      ++tailed;
    } else {
      s = finish_micro_batch(f, pending.front(), rec, &server_sq);
      pending.pop_front();
      ++done;
    }
    if (!s.ok()) return s;
  }
  const auto t0 = Clock::now();
  const double total_sq = compute::run([&] { return side_.grad_sq_norm(); }) + server_sq;
  const double coef = clip_coefficient(total_sq, c_.schedule.clip);
  wire::Status s =
      detail::send_control(ch, wire::ControlKind::kStep, {{"step", step}, {"lr", rec->lr}, {"coef", coef}});
  if (!s.ok()) return s;
  compute::run([&] {
    rec->fwd_map = encode_bit_map(link_->learned_map());  // the map this step's micro-batches travelled with
    side_.step(rec->lr, coef);
    link_->end_step(step);
  });
  position_ += c_.schedule.micro_batches * c_.batch;
  step_ = step + 1;
  rec->client_seconds += seconds_since(t0);
  rec->grad_norm = std::sqrt(total_sq);
  rec->loss = rec->task_loss + link_->regularizer_weight() * rec->reg_loss;
  return s;
}

// Micro-batch m, first half: forward through the client's layers, the activations on their way.
wire::Status ClientTrainer::Run::send_micro_batch(wire::Channel& ch, int64_t m, StepRecord* rec, InFlight* out) {
  const int64_t step = step_;
  const auto t0 = Clock::now();
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < c_.batch; ++i) idx.push_back(sampler_->at(position_ + m * c_.batch + i));
  const Batch b = make_batch(train_, idx, pad_id_, needs_sample_ids() ? c_.seq_len : 0);
  quant::SentActivations sent;
  std::optional<BatchBytes> bytes;
  compute::run([&] {
    const at::Tensor h = side_.part->forward(b.ids, b.mask);
    const auto c0 = Clock::now();
    sent = link_->send_activations(h, step, m, b.sample_ids);
    rec->client_codec_seconds += seconds_since(c0);
    rec->tokens += b.mask.sum().item<int64_t>();
    bytes.emplace(b, sent_label_type());
  });
  out->m = m;
  out->value = sent.value;
  if (tail_link_) out->labels = b.labels, out->mask = b.mask;
  rec->fwd_bits = sent.bits;
  rec->fwd_packet_bytes += sent.packet.size();
  rec->elements += static_cast<uint64_t>(sent.value.numel());
  rec->rows += static_cast<uint64_t>(b.ids.size(0));
  rec->cells += static_cast<uint64_t>(b.ids.numel());
  const auto e0 = Clock::now();
  wire::ForwardMsg fm = bytes->message(step, m, sent.packet);
  if (needs_sample_ids()) fm.sample_ids = b.sample_ids;
  std::string payload = fm.encode();
  out->forward_payload = payload.size();
  rec->client_codec_seconds += seconds_since(e0);
  rec->client_seconds += seconds_since(t0);
  const auto s0 = Clock::now();
  wire::Status s = ch.send({wire::MessageType::kForward, 0, std::move(payload)});
  rec->send_seconds += seconds_since(s0);
  return s;
}

// Micro-batch m, second half: the server's gradient back into the client's graph.
wire::Status ClientTrainer::Run::finish_micro_batch(const wire::Frame& f, InFlight& in, StepRecord* rec,
                                                    double* server_sq_norm) {
  const int64_t step = step_, M = c_.schedule.micro_batches;
  wire::BackwardMsg bm;
  wire::Status s = wire::BackwardMsg::decode(f.payload, &bm);
  if (!s.ok()) return s;
  if (bm.step != static_cast<uint64_t>(step) || bm.micro_batch != static_cast<uint32_t>(in.m)) {
    return wire::Status::Fail(wire::ErrorCode::kBadMessage, "BACKWARD for another step or micro-batch");
  }
  link_sample_.add_down(f.payload.size(), f.arrival_seconds);
  link_sample_.add_up(in.forward_payload, bm.forward_arrival_seconds);
  const auto t0 = Clock::now();
  rec->bwd_packet_bytes += bm.packet.size();
  compute::run([&] {
    at::Tensor dh;  // (B, T, C)
    const auto c0 = Clock::now();
    try {
      dh = link_->receive_gradients(bm.packet, &rec->bwd_bits, side_.device(), in.value.numel());
      rec->client_codec_seconds += seconds_since(c0);
    } catch (const Error& err) {
      s = wire::Status::Fail(wire::ErrorCode::kBadMessage, err.what());
      return;
    }
    if (dh.sizes() != in.value.sizes()) {
      s = wire::Status::Fail(wire::ErrorCode::kBadMessage, "gradient shape differs from the activation's");
      return;
    }
    link_->backward(in.value, dh, step, M, &rec->reg_loss);
  });
  if (!s.ok()) return s;
  rec->client_seconds += seconds_since(t0);
  if (!tail_link_) rec->task_loss += bm.loss / static_cast<double>(M);
  rec->server_seconds += bm.server_seconds;
  rec->server_codec_seconds += bm.server_codec_seconds;
  *server_sq_norm = bm.grad_sq_norm;
  return wire::Status::Ok();
}

wire::Status ClientTrainer::Run::run_tail(wire::Channel& ch, const wire::Frame& f, InFlight& in, StepRecord* rec) {
  const int64_t step = step_, M = c_.schedule.micro_batches;
  wire::BackwardMsg tm;
  wire::Status s = wire::BackwardMsg::decode(f.payload, &tm);
  if (!s.ok()) return s;
  if (tm.step != static_cast<uint64_t>(step) || tm.micro_batch != static_cast<uint32_t>(in.m))
    return wire::Status::Fail(wire::ErrorCode::kBadMessage, "TAIL_FORWARD for another step or micro-batch");
  link_sample_.add_down(f.payload.size(), f.arrival_seconds);
  const auto t0 = Clock::now();
  std::string payload;
  compute::run([&] {
    at::Tensor h;
    const auto c0 = Clock::now();
    try {
      rec->tail_fwd_bits.emplace();
      h = tail_link_->receive_activations(tm.packet, side_.device(), in.value.numel(), &*rec->tail_fwd_bits);
    } catch (const Error& err) {
      s = wire::Status::Fail(wire::ErrorCode::kBadMessage, err.what());
      return;
    }
    rec->client_codec_seconds += seconds_since(c0);
    if (h.sizes() != in.value.sizes()) {
      s = wire::Status::Fail(wire::ErrorCode::kBadMessage, "TAIL_FORWARD activation shape differs from the batch's");
      return;
    }
    h = h.to(side_.tail->dtype()).requires_grad_(true);
    const at::Tensor loss = causal_lm_loss(side_.tail->forward(h, in.mask), in.labels);
    const double loss_v = loss.item<double>();
    if (!std::isfinite(loss_v)) {
      throw Error("the loss at step " + std::to_string(step) + " is not finite: training diverged",
                  "lower --lr or enable --clip");
    }
    (loss / static_cast<double>(M)).backward();
    rec->task_loss += loss_v / static_cast<double>(M);
    const auto e0 = Clock::now();
    wire::BackwardMsg gm;
    gm.step = tm.step;
    gm.micro_batch = tm.micro_batch;
    const std::string packet = tail_link_->send_gradients(h.grad(), step, in.m);
    gm.packet = packet;
    payload = gm.encode();
    rec->client_codec_seconds += seconds_since(e0);
    // Each direction carries both cuts' tensors: the gradient at M goes up, the activations at M came down.
    rec->elements += static_cast<uint64_t>(h.numel());
    rec->fwd_packet_bytes += packet.size();
    rec->bwd_packet_bytes += tm.packet.size();
  });
  if (!s.ok()) return s;
  rec->client_seconds += seconds_since(t0);
  const auto s0 = Clock::now();
  s = ch.send({wire::MessageType::kTailBackward, 0, std::move(payload)});
  rec->send_seconds += seconds_since(s0);
  return s;
}

void ClientTrainer::Run::log_step(StepRecord* rec, const wire::Channel& ch, const wire::Accounting& before,
                                  Clock::time_point t_step, Progress* progress) {
  const wire::Accounting& now = ch.accounting();
  const auto fwd = static_cast<size_t>(wire::MessageType::kForward),
             bwd = static_cast<size_t>(wire::MessageType::kBackward);
  rec->fwd_wire_bytes = now.bytes_sent() - before.bytes_sent();
  rec->bwd_wire_bytes = now.bytes_received() - before.bytes_received();
  rec->forward_frame_bytes = now.sent[fwd].bytes - before.sent[fwd].bytes;
  rec->backward_frame_bytes = now.received[bwd].bytes - before.received[bwd].bytes;
  // Waiting for the server beyond its own time, plus handing frames to the socket.
  rec->network_seconds =
      std::max(0.0, now.seconds_blocked - before.seconds_blocked - rec->server_seconds) + rec->send_seconds;
  rec->step_seconds = seconds_since(t_step);
  rec->tokens_per_second = static_cast<double>(rec->tokens) / std::max(1e-9, rec->step_seconds);
  if (auto_budget_) {
    LinkSample& l = link_sample_;
    l.compute_seconds = std::max(rec->client_seconds, rec->server_seconds);
    l.elements = rec->elements;
    l.fwd_bits = rec->fwd_bits.mean, l.bwd_bits = rec->bwd_bits.mean;
    if (tail_link_) {  // each direction carries both cuts' tensors, as many elements each
      l.fwd_bits = (l.fwd_bits + rec->tail_bwd_bits->mean) / 2;
      l.bwd_bits = (l.bwd_bits + rec->tail_fwd_bits.value_or(rec->bwd_bits).mean) / 2;
    }
    l.fwd_bytes = rec->fwd_wire_bytes, l.bwd_bytes = rec->bwd_wire_bytes;
    if (auto_budget_->observe(l)) {
      link_->set_auto_budgets(link_->forward_spec().within_budget_range(auto_budget_->forward()),
                              link_->backward_spec().within_budget_range(auto_budget_->backward()));
    }
    // At M the activations travel down and the gradients up; set once choosing (a reconnected
    // session's first choice may equal the budgets restored at K but not those at M).
    if (tail_link_ && auto_budget_->choosing()) {
      if (tail_link_->forward_budget_auto())
        tail_fwd_budget_ = tail_link_->forward_spec().within_budget_range(auto_budget_->backward());
      tail_link_->set_auto_budgets(0, tail_link_->backward_spec().within_budget_range(auto_budget_->forward()));
    }
    l = {};
    rec->auto_budget = StepRecord::AutoBudgetRecord{
        link_->forward_target(), link_->backward_target(), auto_budget_->up_bytes_per_second(),
        auto_budget_->down_bytes_per_second(), auto_budget_->compute_seconds()};
  }
  metrics_->write(rec->to_json());
  if (!c_.quiet) progress->update(*rec, now.bytes_sent() + now.bytes_received());
}

// Rows [0, limit) of `d` through the server: per row NLL sum, labelled tokens, argmax hits.
wire::Status ClientTrainer::Run::score_remote(wire::Channel& ch, const Dataset& d, int64_t limit,
                                              std::vector<RowScore>* out) {
  for (int64_t at_row = 0; at_row < limit; at_row += c_.batch) {
    const std::vector<int64_t> idx = range(at_row, std::min(limit, at_row + c_.batch));
    const Batch b = make_batch(d, idx, pad_id_);
    std::string packet;
    std::optional<BatchBytes> bytes;
    compute::run([&] {
      at::NoGradGuard no_grad;
      packet = link_->encode_eval(side_.part->forward(b.ids, b.mask));
      bytes.emplace(b, sent_label_type());
    });
    wire::Status s = ch.send({wire::MessageType::kEval, 0, bytes->message(step_, 0, packet).encode()});
    wire::Frame f;
    if (s.ok())
      s = detail::expect(ch, tail_link_ ? wire::MessageType::kTailForward : wire::MessageType::kEval,
                         std::chrono::minutes(10), &f);
    wire::EvalResultMsg res;
    if (s.ok() && tail_link_) s = score_tail(f, b, &res);
    if (s.ok() && !tail_link_) s = wire::EvalResultMsg::decode(f.payload, &res);
    if (!s.ok()) return s;
    if (res.rows.size() != idx.size())
      return wire::Status::Fail(wire::ErrorCode::kBadMessage, "EVAL result with the wrong row count");
    for (const auto& r : res.rows) out->push_back({r.nll_sum, r.tokens, r.correct});
  }
  return wire::Status::Ok();
}

wire::Status ClientTrainer::Run::score_tail(const wire::Frame& f, const Batch& b, wire::EvalResultMsg* out) {
  wire::BackwardMsg tm;
  wire::Status s = wire::BackwardMsg::decode(f.payload, &tm);
  if (!s.ok()) return s;
  compute::run([&] {
    at::NoGradGuard no_grad;
    at::Tensor h;
    try {
      h = tail_link_->receive_eval(tm.packet, side_.device(), b.ids.numel() * model_.hidden_size);
    } catch (const Error& err) {
      s = wire::Status::Fail(wire::ErrorCode::kBadMessage, err.what());
      return;
    }
    if (h.dim() != 3 || h.size(0) != b.ids.size(0) || h.size(1) != b.ids.size(1) || h.size(2) != model_.hidden_size) {
      s = wire::Status::Fail(wire::ErrorCode::kBadMessage, "TAIL_FORWARD activation shape differs from the batch's");
      return;
    }
    for (const RowScore& r : score_rows(side_.tail->forward(h.to(side_.tail->dtype()), b.mask), b.labels))
      out->rows.push_back({r.nll_sum, r.tokens, r.correct});
  });
  return s;
}

wire::Status ClientTrainer::Run::evaluate(wire::Channel& ch) {
  if (val_.examples.empty()) return wire::Status::Ok();
  const auto n = static_cast<int64_t>(val_.examples.size());
  const int64_t limit = c_.eval_batches > 0 ? std::min(n, c_.eval_batches * c_.batch) : n;
  std::vector<RowScore> rows;
  wire::Status s = score_remote(ch, val_, limit, &rows);
  if (!s.ok()) return s;
  final_eval_ = score_summary(rows);
  final_eval_["step"] = step_;
  if (val_.format == DataFormat::kClassification && !val_.label_words.empty()) {
    const LabelWordChoice choice = label_word_candidates(val_, limit, *tok_);
    std::vector<RowScore> scores;
    s = score_remote(ch, choice.candidates, static_cast<int64_t>(choice.candidates.examples.size()), &scores);
    if (!s.ok()) return s;
    final_eval_["accuracy"] = choice.accuracy(scores);
  }
  metrics_->write({{"eval", final_eval_}});
  return wire::Status::Ok();
}

// Both sides checkpoint the same step; the final one also brings the server's side options and
// its LoRA (full weights stay on the server).
wire::Status ClientTrainer::Run::checkpoint(wire::Channel& ch, bool final) {
  wire::Status s = detail::send_control(ch, wire::ControlKind::kCheckpoint, {{"step", step_}, {"final", final}});
  wire::Frame f;
  nlohmann::json reply;
  std::string blob;
  if (s.ok()) s = detail::expect(ch, wire::MessageType::kControl, std::chrono::minutes(10), &f);
  if (s.ok()) s = detail::parse_control(f, wire::ControlKind::kCheckpoint, &reply, &blob);
  if (!s.ok()) return s;
  if (!reply.value("ok", false) || !reply.contains("step") || !reply["step"].is_number_integer() ||
      reply["step"].get<int64_t>() != step_) {
    return wire::Status::Fail(wire::ErrorCode::kBadMessage,
                              "server did not confirm the checkpoint at step " + std::to_string(step_));
  }
  compute::run([&] {
    save_side_checkpoint(
        ckpt_root_, step_, side_, *link_,
        {{"step", step_}, {"position", position_}, {"run_id", run_id_}, {"side", side_.options.to_json()}},
        c_.keep_checkpoints, tail_link_.get());
  });
  if (final) {
    const std::string dir = join_path(c_.run_dir, "server_adapter");
    make_dirs(dir);
    if (!blob.empty()) write_file_atomic(join_path(dir, "adapter_model.safetensors"), blob);
    write_file_atomic(join_path(dir, "side.json"), reply.at("side").dump(2) + "\n");
  }
  return wire::Status::Ok();
}

wire::Status ClientTrainer::Run::fed_average(wire::Channel& ch) {
  std::string blob = compute::run([&] { return safetensors_bytes(side_.state()); });
  wire::Status s =
      detail::send_control(ch, wire::ControlKind::kFedAvg, {{"step", step_}, {"tokens", fed_tokens_}}, std::move(blob));
  wire::Frame f;
  nlohmann::json reply;
  std::string averaged;
  if (s.ok()) s = detail::expect(ch, wire::MessageType::kControl, std::chrono::minutes(10), &f);
  if (s.ok()) s = detail::parse_control(f, wire::ControlKind::kFedAvg, &reply, &averaged);
  if (!s.ok()) return s;
  try {
    const auto tensors = safetensors_from_bytes(averaged, "the federation's average");
    compute::run([&] { side_.load_state(tensors, "the federation's average"); });
  } catch (const Error& e) {
    return wire::Status::Fail(wire::ErrorCode::kBadMessage, e.what());
  }
  spdlog::debug("run {}: client side averaged with federation {} at step {} ({} members)", run_id_, c_.federation,
                step_, reply.value("members", 0));
  fed_tokens_ = 0;
  return wire::Status::Ok();
}

void ClientTrainer::Run::server_stopped(wire::Channel& ch, const wire::Status& why) {
  const auto steps = list_checkpoints(ckpt_root_);
  const bool saved = !steps.empty() && steps.back() == step_;
  // AQ-SGD's sender memories already hold the FORWARDs the server left unanswered: a checkpoint now
  // would not match the server's, so the run goes on from the last one both sides made.
  const bool save_now = !saved && !needs_sample_ids() && checkpoint(ch, false).ok();
  ch.send({wire::MessageType::kBye, 0, {}});
  ch.close();
  const std::string at = why.message + " at step " + std::to_string(step_) + "; ";
  if (saved || save_now)
    throw Error(at + "both sides saved step " + std::to_string(step_),
                "rerun the same command with --resume when the server is back");
  if (steps.empty()) throw Error(at + "no checkpoint was made yet", "start the run again when the server is back");
  throw Error(at + "the run resumes from its last checkpoint, step " + std::to_string(steps.back()),
              "rerun the same command with --resume when the server is back");
}

RunResult ClientTrainer::Run::finish(wire::Channel& ch) {
  ch.send({wire::MessageType::kBye, 0, {}});
  ch.close();
  if (side_.device().is_cuda() && !c_.quiet) {
    spdlog::info("peak GPU memory of this process on {}: {:.2f} GB", side_.device().str(),
                 static_cast<double>(peak_memory_bytes(side_.device())) / 1e9);
  }
  metrics_->write(
      {{"session",
        {{"bytes_sent", ch.accounting().bytes_sent()}, {"bytes_received", ch.accounting().bytes_received()}}}});
  RunResult out;
  out.steps = read_metrics(join_path(c_.run_dir, "metrics.jsonl"));
  out.eval = final_eval_;
  out.completed_steps = step_;
  out.run_dir = c_.run_dir;
  out.summary = summarize(out.steps, final_eval_);
  write_file_atomic(join_path(c_.run_dir, "summary.txt"), out.summary);
  // The page is a view of the files above: failing to draw it does not fail the run.
  try {
    write_report({c_.run_dir}, join_path(c_.run_dir, "report.html"));
  } catch (const std::exception& e) {
    spdlog::warn("could not write {}: {}", join_path(c_.run_dir, "report.html"), e.what());
  }
  const std::vector<int64_t> widths = link_->learned_map();
  if (!widths.empty()) {  // reusable as `fixed:map=FILE[,shuffle=SEED]` (the random-map ablation)
    write_file_atomic(join_path(c_.run_dir, "fwd_bit_map.json"), nlohmann::json(widths).dump() + "\n");
  }
  if (!c_.quiet) std::fprintf(stderr, "%s", out.summary.c_str());
  return out;
}

}  // namespace amaq::train
