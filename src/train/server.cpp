// The server side of a run: one session per client connection (see session.h for the protocol).
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>

#include "core/error.h"
#include "core/fs.h"
#include "model/part.h"
#include "quant/amaq.h"
#include "train/checkpoint.h"
#include "train/session.h"
#include "train/session_util.h"
#include "train/side.h"
#include "wire/handshake.h"
#include "wire/messages.h"

namespace amaq::train {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

wire::Status bad(std::string why) { return wire::Status::Fail(wire::ErrorCode::kBadMessage, std::move(why)); }

// Raised while setting up a run the client asked to resume; becomes an ERROR "cannot resume".
struct ResumeError : Error {
  using Error::Error;
};

}  // namespace

struct TrainServer::Run {
  std::string id, root;
  Schedule schedule;
  int64_t batch = 0, seq_len = 0;
  Side side;
  std::unique_ptr<quant::Codec> fwd, bwd, eval;  // eval: AQ-SGD runs evaluate through a direct codec
  quant::CodecSpec bwd_spec;
  double bwd_budget = 0;
  std::unique_ptr<JsonlLog> log;
  int64_t step = 0;  // optimizer steps completed
  double loss_sum = 0, seconds = 0;
  int micro = 0;

  quant::Codec& eval_codec() { return eval ? *eval : *fwd; }
};

TrainServer::TrainServer(ServerConfig cfg) : cfg_(std::move(cfg)) {
  model_ = ModelConfig::load(cfg_.model);
  ckpt_ = std::make_unique<CheckpointReader>(cfg_.model);
  fingerprint_ = model_fingerprint(model_, *ckpt_);
  if (cfg_.split < 1 || cfg_.split >= model_.num_layers) {
    throw Error("split " + std::to_string(cfg_.split) + " outside [1, " + std::to_string(model_.num_layers - 1) + "]",
                "the client keeps layers [0, K) and the server [K, L)");
  }
  fwd_spec_ = quant::CodecSpec::parse(cfg_.fwd_codec);
  bwd_spec_ = quant::CodecSpec::parse(cfg_.bwd_codec);
  if (bwd_spec_.codec == quant::CodecId::kAmaq && fwd_spec_.codec != quant::CodecId::kAmaq) {
    throw Error("an amaq backward codec needs an amaq forward codec", "the gradient map is the forward map shifted to its budget");
  }
  make_dirs(cfg_.run_dir);
}

TrainServer::~TrainServer() = default;

uint64_t TrainServer::max_payload() const {
  // Frames carry at most max(batch * seq) activations; allow 64K tokens of fp32 per micro-batch.
  return wire::max_payload_for(1, 65536, static_cast<uint64_t>(model_.hidden_size));
}

wire::Status TrainServer::serve(wire::Channel& ch, uint64_t session_id) {
  try {
    return serve_session(ch, session_id);
  } catch (const std::exception& e) {
    const auto* c10 = dynamic_cast<const c10::Error*>(&e);
    wire::Status s = wire::Status::Fail(wire::ErrorCode::kInternal, c10 ? c10->what_without_backtrace() : e.what());
    spdlog::error("session {}: {}", session_id, s.message);
    wire::refuse(ch, s);
    return s;
  }
}

wire::Status TrainServer::serve_session(wire::Channel& ch, uint64_t session_id) {
  wire::ServerPolicy policy;
  policy.model_fingerprint = fingerprint_;
  policy.split = cfg_.split;
  policy.fwd_codec = fwd_spec_.to_string();
  policy.bwd_codec = bwd_spec_.to_string();
  policy.token = cfg_.token;
  policy.settings = {{"max_payload", max_payload()}};
  wire::Hello hello;
  wire::Status s = wire::server_handshake(ch, policy, session_id, cfg_.handshake_timeout, &hello);
  if (!s.ok()) {
    spdlog::warn("session {}: handshake failed: {} ({})", session_id, s.message, wire::error_name(s.code));
    return s;
  }
  auto fail = [&](wire::Status why) {
    spdlog::warn("session {}: {} ({})", session_id, why.message, wire::error_name(why.code));
    wire::refuse(ch, why);
    return why;
  };

  // SCHEDULE: which run, from which step, with what schedule.
  wire::Frame f;
  nlohmann::json j;
  s = detail::expect(ch, wire::MessageType::kControl, cfg_.handshake_timeout, &f);
  if (s.ok()) s = detail::parse_control(f, wire::ControlKind::kSchedule, &j);
  if (!s.ok()) return fail(s);
  auto run = std::make_unique<Run>();
  int64_t resume_step = -1;
  try {
    run->id = j.at("run_id").get<std::string>();
    resume_step = j.at("resume_step").get<int64_t>();
    run->batch = j.at("batch").get<int64_t>();
    run->seq_len = j.at("seq_len").get<int64_t>();
    run->schedule = Schedule::from_json(j.at("schedule"));
  } catch (const nlohmann::json::exception& e) {
    return fail(bad(std::string("SCHEDULE: ") + e.what()));
  } catch (const Error& e) {
    return fail(bad(e.what()));
  }
  if (!detail::valid_run_id(run->id)) return fail(bad("SCHEDULE: run_id must be 8-64 lowercase hex characters"));
  if (run->batch < 1 || run->seq_len < 2 || static_cast<uint64_t>(run->batch * run->seq_len) > 65536) {
    return fail(bad("SCHEDULE: batch x seq_len must be in [2, 65536] tokens per micro-batch"));
  }

  // One session per run: a reconnecting client waits for its old session to end.
  std::shared_ptr<std::timed_mutex> run_mu;
  {
    std::lock_guard<std::mutex> lock(runs_mu_);
    auto& m = runs_[run->id];
    if (!m) m = std::make_shared<std::timed_mutex>();
    run_mu = m;
  }
  std::unique_lock<std::timed_mutex> run_lock(*run_mu, std::defer_lock);
  if (!run_lock.try_lock_for(std::chrono::seconds(30))) {
    return fail(wire::Status::Fail(wire::ErrorCode::kResume, "run " + run->id + " already has a live session on this server"));
  }

  run->root = join_path(cfg_.run_dir, run->id);
  try {
    run->side = Side::build(model_, *ckpt_, SideRole::kServer, cfg_.split, cfg_.side, run->schedule.seed + 1,
                            run->schedule.weight_decay);
    run->fwd = std::make_unique<quant::Codec>(fwd_spec_);
    run->bwd_spec = detail::backward_spec(bwd_spec_);
    run->bwd = std::make_unique<quant::Codec>(run->bwd_spec);
    if (fwd_spec_.codec == quant::CodecId::kAqsgd) run->eval = std::make_unique<quant::Codec>(detail::direct_spec(fwd_spec_));
    if (bwd_spec_.codec == quant::CodecId::kAmaq) run->bwd_budget = quant::budget_at(bwd_spec_, 0);
    if (resume_step >= 0) {
      const std::string dir = checkpoint_path(run->root, resume_step);
      if (!file_exists(dir)) {
        std::string have;
        for (int64_t st : list_checkpoints(run->root)) have += (have.empty() ? "" : ", ") + std::to_string(st);
        throw ResumeError("no checkpoint of run " + run->id + " at step " + std::to_string(resume_step) + " on the server (it has: " +
                              (have.empty() ? "none" : have) + ")",
                          "resume from a checkpoint both sides hold, or start a new run");
      }
      auto tensors = load_safetensors(join_path(dir, "state.safetensors"));
      run->side.load_state(tensors, dir);
      detail::restore_aqsgd_state(*run->fwd, tensors);
      load_optimizer(*run->side.opt, read_file(join_path(dir, "optim.pt")), dir);
      {
        std::lock_guard<std::mutex> lock(rng_mutex());
        set_cpu_rng_state(tensors.at("rng"));
      }
      auto state = nlohmann::json::parse(read_file(join_path(dir, "state.json")));
      run->bwd_budget = state.at("bwd_budget").get<double>();
      run->step = resume_step;
    } else if (!list_checkpoints(run->root).empty()) {
      throw ResumeError("run " + run->id + " already has checkpoints on the server", "resume it (--resume) instead of starting it again");
    }
    make_dirs(run->root);
    run->log = std::make_unique<JsonlLog>(join_path(run->root, "metrics.jsonl"));
  } catch (const ResumeError& e) {
    return fail(wire::Status::Fail(wire::ErrorCode::kResume, e.what()));
  }
  s = detail::send_control(ch, wire::ControlKind::kSchedule,
                           {{"resume_step", resume_step}, {"side", run->side.options.to_json()},
                            {"layers", {cfg_.split, model_.num_layers}}});
  if (!s.ok()) return s;
  spdlog::info("session {}: run {} {} at step {} ({} steps, {} x {} tokens x {} micro-batches)", session_id, run->id,
               resume_step >= 0 ? "resumed" : "started", run->step, run->schedule.steps, run->batch, run->seq_len,
               run->schedule.micro_batches);

  const int64_t C = model_.hidden_size;
  // The link failed (the client vanished, or a send or receive timed out): the run's state stays
  // on disk for a resume.
  auto dropped = [&](wire::Status why) {
    spdlog::warn("session {}: run {} dropped after step {}: {} ({})", session_id, run->id, run->step, why.message,
                 wire::error_name(why.code));
    return why;
  };
  while (true) {
    s = ch.receive(&f, cfg_.idle_timeout);
    if (!s.ok()) return dropped(s);
    if (f.type == wire::MessageType::kBye) {
      run->log->write({{"session", {{"bytes_sent", ch.accounting().bytes_sent()}, {"bytes_received", ch.accounting().bytes_received()}}}});
      spdlog::info("session {}: run {} ended by the client after step {}", session_id, run->id, run->step);
      return wire::Status::Ok();
    }
    if (f.type == wire::MessageType::kForward || f.type == wire::MessageType::kEval) {
      const bool train = f.type == wire::MessageType::kForward;
      wire::ForwardMsg fm;
      s = wire::ForwardMsg::decode(f.payload, &fm);
      if (!s.ok()) return fail(s);
      const int64_t B = fm.batch, T = fm.seq;
      if (fm.labels.size() != static_cast<size_t>(B * T)) return fail(bad("FORWARD/EVAL without labels"));
      at::Tensor h;
      try {
        h = (train ? *run->fwd : run->eval_codec()).decode(fm.packet);
      } catch (const Error& e) {
        return fail(bad(e.what()));
      }
      if (h.dim() != 3 || h.size(0) != B || h.size(1) != T || h.size(2) != C) {
        return fail(bad("activation shape does not match (batch, seq, hidden)"));
      }
      at::Tensor labels = at::from_blob(fm.labels.data(), {B, T}, at::kLong).clone();
      at::Tensor mask;
      if (!fm.mask.empty()) mask = at::from_blob(fm.mask.data(), {B, T}, at::kByte).to(at::kLong);
      const auto t0 = Clock::now();
      wire::HeartbeatScope alive(ch, std::chrono::seconds(2));
      if (!train) {
        at::NoGradGuard no_grad;
        wire::EvalResultMsg res = detail::score_rows(run->side.part->forward(h.to(run->side.part->dtype()), mask), labels, fm.step);
        s = ch.send({wire::MessageType::kEval, 0, res.encode()});
        if (!s.ok()) return dropped(s);
        continue;
      }
      h = h.to(run->side.part->dtype()).requires_grad_(true);
      at::Tensor loss = causal_lm_loss(run->side.part->forward(h, mask), labels);
      const double loss_v = loss.item<double>();
      if (!std::isfinite(loss_v)) {
        return fail(bad("the loss at step " + std::to_string(fm.step) + " is not finite: training diverged (lower --lr or enable --clip)"));
      }
      (loss / static_cast<double>(run->schedule.micro_batches)).backward();
      quant::EncodeArgs args;
      args.seed = fm.step * 1000003 + fm.micro_batch;
      if (run->bwd_spec.codec == quant::CodecId::kAmaq) {
        args.bits = quant::shift_bit_map(run->fwd->received_map(), run->bwd_budget, run->bwd_spec.bits_min, run->bwd_spec.bits_max);
      }
      quant::Encoded e = run->bwd->encode(h.grad(), args);
      wire::BackwardMsg bm;
      bm.step = fm.step;
      bm.micro_batch = fm.micro_batch;
      bm.loss = static_cast<float>(loss_v);
      const bool last = fm.micro_batch + 1 == static_cast<uint64_t>(run->schedule.micro_batches);
      bm.grad_sq_norm = last ? run->side.grad_sq_norm() : 0.0;
      bm.server_seconds = static_cast<float>(seconds_since(t0));
      bm.packet = std::move(e.packet);
      run->loss_sum += loss_v;
      run->seconds += bm.server_seconds;
      ++run->micro;
      s = ch.send({wire::MessageType::kBackward, 0, bm.encode()});
      if (!s.ok()) return dropped(s);
      continue;
    }
    if (f.type != wire::MessageType::kControl) return fail(bad(std::string("unexpected ") + wire::message_name(f.type)));
    wire::ControlMsg cm;
    s = wire::ControlMsg::decode(f.payload, &cm);
    if (!s.ok()) return fail(s);
    j = nlohmann::json::parse(cm.json, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return fail(bad("CONTROL body is not a JSON object"));
    try {
      switch (cm.kind) {
        case wire::ControlKind::kBitSync:
          run->bwd_budget = j.at("budget").get<double>();
          break;
        case wire::ControlKind::kStep: {
          const int64_t step = j.at("step").get<int64_t>();
          const double lr = j.at("lr").get<double>(), coef = j.at("coef").get<double>();
          if (step != run->step) return fail(bad("STEP " + std::to_string(step) + " but the server is at step " + std::to_string(run->step)));
          if (!(coef > 0 && coef <= 1) || !(lr >= 0)) return fail(bad("STEP with lr or clip coefficient out of range"));
          run->side.step(lr, coef);
          run->side.zero_grad();
          run->log->write({{"step", step}, {"loss", run->micro ? run->loss_sum / run->micro : 0.0}, {"lr", lr}, {"coef", coef},
                           {"server_seconds", run->seconds}, {"bwd_budget", run->bwd_budget}});
          run->loss_sum = run->seconds = 0;
          run->micro = 0;
          ++run->step;
          ++steps_served_;
          break;
        }
        case wire::ControlKind::kCheckpoint: {
          const int64_t step = j.at("step").get<int64_t>();
          const bool final = j.value("final", false);
          if (step != run->step) return fail(bad("CHECKPOINT at step " + std::to_string(step) + " but the server is at step " + std::to_string(run->step)));
          NamedTensors tensors = run->side.state();
          {
            std::lock_guard<std::mutex> lock(rng_mutex());
            tensors.emplace_back("rng", cpu_rng_state());
          }
          detail::add_aqsgd_state(*run->fwd, &tensors);
          write_checkpoint(run->root, step,
                           {{"state.safetensors", safetensors_bytes(tensors)},
                            {"optim.pt", optimizer_bytes(*run->side.opt)},
                            {"state.json", nlohmann::json{{"step", step}, {"run_id", run->id}, {"bwd_budget", run->bwd_budget}}.dump(2)}});
          prune_checkpoints(run->root, cfg_.keep_checkpoints);
          nlohmann::json reply{{"step", step}, {"ok", true}, {"side", run->side.options.to_json()}};
          std::string blob;
          if (final && !run->side.options.full) blob = safetensors_bytes(run->side.state(), {{"format", "pt"}});
          s = detail::send_control(ch, wire::ControlKind::kCheckpoint, reply, std::move(blob));
          if (!s.ok()) return dropped(s);
          break;
        }
        default:
          return fail(bad("CONTROL kind " + std::to_string(static_cast<int>(cm.kind)) + " is not expected during training"));
      }
    } catch (const nlohmann::json::exception& e) {
      return fail(bad(std::string("CONTROL: ") + e.what()));
    }
  }
}

}  // namespace amaq::train
