// The client side of a run: owns the data, the schedule, the run directory; drives the server
// (see session.h for the protocol).
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <thread>

#include "core/error.h"
#include "core/fs.h"
#include "core/hash.h"
#include "model/part.h"
#include "model/peft.h"
#include "quant/amaq.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/session.h"
#include "train/session_util.h"
#include "train/side.h"
#include "wire/handshake.h"
#include "wire/messages.h"

namespace amaq::train {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A failure of the link (worth reconnecting) rather than a refusal or a protocol violation.
bool is_link_failure(const wire::Status& s) {
  return s.code == wire::ErrorCode::kClosed || s.code == wire::ErrorCode::kTimeout || s.code == wire::ErrorCode::kTruncated;
}

[[noreturn]] void refused(const wire::Status& s) {
  std::string hint = "check that both sides run the same model, split and codecs";
  if (s.code == wire::ErrorCode::kBadAuth) hint = "use the token file the server was started with";
  if (s.code == wire::ErrorCode::kResume) hint = "start a new run directory, or resume from a step the server has";
  throw Error(std::string("server refused the run: ") + s.message + " (" + wire::error_name(s.code) + ")", hint);
}

BitsStats stats_of(const at::Tensor& map, double nominal) {
  if (!map.defined() || map.numel() == 0) return {nominal, nominal, nominal};
  at::Tensor m = map.to(at::kDouble);
  return {m.mean().item<double>(), m.min().item<double>(), m.max().item<double>()};
}

// The FORWARD / EVAL body for a batch and its packet.
wire::ForwardMsg forward_msg(int64_t step, int64_t micro_batch, const Batch& b, std::string packet, bool with_sample_ids) {
  wire::ForwardMsg fm;
  fm.step = static_cast<uint64_t>(step);
  fm.micro_batch = static_cast<uint32_t>(micro_batch);
  fm.batch = static_cast<uint32_t>(b.ids.size(0));
  fm.seq = static_cast<uint32_t>(b.ids.size(1));
  at::Tensor labels = b.labels.contiguous(), mask = b.mask.to(at::kByte).contiguous();
  fm.labels.assign(labels.data_ptr<int64_t>(), labels.data_ptr<int64_t>() + labels.numel());
  fm.mask.assign(mask.data_ptr<uint8_t>(), mask.data_ptr<uint8_t>() + mask.numel());
  if (with_sample_ids) fm.sample_ids = b.sample_ids;
  fm.packet = std::move(packet);
  return fm;
}

std::string fmt_mb(uint64_t bytes) { return fmt::format("{:.3f}", static_cast<double>(bytes) / 1e6); }

}  // namespace

// Everything that changes during the run and goes into a checkpoint.
struct ClientTrainer::State {
  Side side;
  std::unique_ptr<quant::Codec> fwd, bwd, eval;
  quant::AmaqGates gates{nullptr};
  std::unique_ptr<torch::optim::AdamW> gate_opt;
  int64_t step = 0;      // optimizer steps completed
  int64_t position = 0;  // training examples consumed
  double bwd_budget_sent = -1;
  quant::Codec& eval_codec() { return eval ? *eval : *fwd; }
};

ClientTrainer::ClientTrainer(ClientConfig cfg) : cfg_(std::move(cfg)) {}
ClientTrainer::~ClientTrainer() = default;

RunResult ClientTrainer::run(const Connector& connect) {
  const ClientConfig& c = cfg_;
  const std::string ckpt_root = join_path(c.run_dir, "checkpoints");
  const std::string run_file = join_path(c.run_dir, "run.json");
  const auto fwd_spec = quant::CodecSpec::parse(c.fwd_codec), bwd_spec = quant::CodecSpec::parse(c.bwd_codec);
  if (bwd_spec.codec == quant::CodecId::kAmaq && fwd_spec.codec != quant::CodecId::kAmaq) {
    throw Error("an amaq backward codec needs an amaq forward codec", "the gradient map is the forward map shifted to its budget");
  }
  Schedule::from_json(c.schedule.to_json());  // validates
  if (c.batch < 1) throw Error("--batch must be at least 1", "");

  // The run directory: a new run, or the one being resumed.
  std::string run_id;
  if (c.resume) {
    if (!file_exists(run_file)) throw Error(c.run_dir + " holds no run to resume (no run.json)", "drop --resume to start a new run");
    run_id = nlohmann::json::parse(read_file(run_file)).at("run_id").get<std::string>();
  } else {
    if (!list_checkpoints(ckpt_root).empty() || file_exists(run_file)) {
      throw Error(c.run_dir + " already holds a run", "pass --resume to continue it, or choose another --run-dir");
    }
    make_dirs(c.run_dir);
    run_id = random_hex(16);
    write_file_atomic(run_file, nlohmann::json{{"run_id", run_id}, {"model", c.model}, {"split", c.split},
                                               {"side", c.side.to_json()}, {"fwd_codec", c.fwd_codec}, {"bwd_codec", c.bwd_codec}}
                                    .dump(2) + "\n");
  }
  {
    std::string cfg_text, table;
    std::vector<std::vector<std::string>> rows{{"option", "value"}};
    for (const auto& [k, v] : c.resolved) {
      cfg_text += k + " = " + nlohmann::json(v).dump() + "\n";
      rows.push_back({k, v});
    }
    write_file_atomic(join_path(c.run_dir, "config.toml"), "# resolved configuration of run " + run_id + "\n" + cfg_text);
    if (!c.quiet && !c.resolved.empty()) std::fprintf(stderr, "%s", format_table(rows).c_str());
  }

  // Model, tokenizer, data.
  const ModelConfig model = ModelConfig::load(c.model);
  const CheckpointReader ckpt(c.model);
  const std::string fingerprint = model_fingerprint(model, ckpt);
  auto tok = load_tokenizer(c.tokenizer == "auto" ? c.model : c.tokenizer);
  if (tok->vocab_size() > model.vocab_size) {
    throw Error("tokenizer '" + tok->name() + "' has " + std::to_string(tok->vocab_size()) + " ids but the model only " +
                    std::to_string(model.vocab_size),
                "use the model's own tokenizer");
  }
  Dataset train = Dataset::load(c.data, *tok, c.seq_len);
  Dataset val;
  if (!c.val_data.empty()) val = Dataset::load(c.val_data, *tok, c.seq_len);
  else if (c.val_fraction > 0) val = train.split_off(c.val_fraction, c.schedule.seed);
  const Sampler sampler(static_cast<int64_t>(train.examples.size()), c.schedule.seed);
  const int64_t pad_id = tok->eos_id() >= 0 ? tok->eos_id() : 0;
  const int64_t pad_to = fwd_spec.codec == quant::CodecId::kAqsgd ? c.seq_len : 0;
  const int64_t M = c.schedule.micro_batches;
  const double nominal_fwd = fwd_spec.nominal_bits(), nominal_bwd = detail::backward_spec(bwd_spec).nominal_bits();

  JsonlLog metrics(join_path(c.run_dir, "metrics.jsonl"));
  nlohmann::json final_eval;
  int64_t attempts_left = c.retries;
  bool resume = c.resume;

  while (true) {
    // State: fresh, or from the newest checkpoint.
    State st;
    st.side = Side::build(model, ckpt, SideRole::kClient, c.split, c.side, c.schedule.seed, c.schedule.weight_decay);
    st.fwd = std::make_unique<quant::Codec>(fwd_spec);
    st.bwd = std::make_unique<quant::Codec>(detail::backward_spec(bwd_spec));
    if (fwd_spec.codec == quant::CodecId::kAqsgd) st.eval = std::make_unique<quant::Codec>(detail::direct_spec(fwd_spec));
    if (fwd_spec.codec == quant::CodecId::kAmaq) {
      st.gates = quant::AmaqGates(model.hidden_size, fwd_spec);
      st.gate_opt = std::make_unique<torch::optim::AdamW>(std::vector<at::Tensor>{st.gates->gates},
                                                          torch::optim::AdamWOptions(c.schedule.gate_lr).weight_decay(0));
    }
    int64_t resume_step = -1;
    const auto have = list_checkpoints(ckpt_root);
    if (resume) {
      if (have.empty()) throw Error(c.run_dir + " has no checkpoint to resume from", "the run stopped before its first checkpoint: start it again");
      resume_step = have.back();
      const std::string dir = checkpoint_path(ckpt_root, resume_step);
      auto tensors = load_safetensors(join_path(dir, "state.safetensors"));
      st.side.load_state(tensors, dir);
      load_optimizer(*st.side.opt, read_file(join_path(dir, "optim.pt")), dir);
      if (st.gates) {
        at::NoGradGuard no_grad;
        st.gates->gates.copy_(tensors.at("amaq.gates"));
        load_optimizer(*st.gate_opt, read_file(join_path(dir, "gate_optim.pt")), dir);
      }
      detail::restore_aqsgd_state(*st.fwd, tensors);
      {
        std::lock_guard<std::mutex> lock(rng_mutex());
        set_cpu_rng_state(tensors.at("rng"));
      }
      auto state = nlohmann::json::parse(read_file(join_path(dir, "state.json")));
      st.step = state.at("step").get<int64_t>();
      st.position = state.at("position").get<int64_t>();
    }

    // Connect, handshake, agree on the run and its step.
    std::unique_ptr<wire::Channel> ch;
    wire::Status s = connect(&ch);
    wire::HelloAck ack;
    if (s.ok()) {
      wire::Hello hello;
      hello.model_fingerprint = fingerprint;
      hello.split = c.split;
      hello.fwd_codec = fwd_spec.to_string();
      hello.bwd_codec = bwd_spec.to_string();
      hello.resume_step = resume_step;
      s = wire::client_handshake(*ch, hello, c.token, std::chrono::seconds(30), &ack);
    }
    wire::Frame f;
    nlohmann::json j;
    if (s.ok()) {
      s = detail::send_control(*ch, wire::ControlKind::kSchedule,
                               {{"run_id", run_id}, {"resume_step", resume_step}, {"schedule", c.schedule.to_json()},
                                {"batch", c.batch}, {"seq_len", c.seq_len}});
    }
    if (s.ok()) s = detail::expect(*ch, wire::MessageType::kControl, std::chrono::minutes(2), &f);
    if (s.ok()) s = detail::parse_control(f, wire::ControlKind::kSchedule, &j);
    if (!s.ok()) {
      if (is_link_failure(s) || s.code == wire::ErrorCode::kTls || s.code == wire::ErrorCode::kInternal) {
        if (attempts_left-- > 0) {
          spdlog::warn("connecting failed: {}; retrying in 2 s ({} attempts left)", s.message, attempts_left + 1);
          std::this_thread::sleep_for(std::chrono::seconds(2));
          resume = !list_checkpoints(ckpt_root).empty();
          continue;
        }
        throw Error("cannot reach the server: " + s.message, "check --connect, TLS files and that the server runs");
      }
      refused(s);
    }
    if (!c.quiet) {
      spdlog::info("run {}: {} at step {} of {}, session {}", run_id, resume_step >= 0 ? "resumed" : "started", st.step,
                   c.schedule.steps, ack.session_id);
    }

    // Steps.
    Progress progress(st.step, c.schedule.steps, c.progress_bar);
    const int64_t last = c.stop_after >= 0 ? std::min<int64_t>(c.stop_after, c.schedule.steps) : c.schedule.steps;
    // Rows [0, limit) of `d` through the server: per row NLL sum, labelled tokens, argmax hits.
    auto eval_rows = [&](wire::Channel& chan, const Dataset& d, int64_t limit, std::vector<wire::EvalResultMsg::Row>* out) {
      at::NoGradGuard no_grad;
      for (int64_t at_row = 0; at_row < limit; at_row += c.batch) {
        std::vector<int64_t> idx;
        for (int64_t i = at_row; i < std::min(limit, at_row + c.batch); ++i) idx.push_back(i);
        Batch b = make_batch(d, idx, pad_id);
        at::Tensor h = st.side.part->forward(b.ids, b.mask);
        quant::EncodeArgs args;
        if (st.gates) args.bits = st.gates->bit_map();
        quant::Encoded e = st.eval_codec().encode(h, args);
        const wire::ForwardMsg fm = forward_msg(st.step, 0, b, std::move(e.packet), false);
        wire::Status es = chan.send({wire::MessageType::kEval, 0, fm.encode()});
        if (es.ok()) es = detail::expect(chan, wire::MessageType::kEval, std::chrono::minutes(10), &f);
        wire::EvalResultMsg res;
        if (es.ok()) es = wire::EvalResultMsg::decode(f.payload, &res);
        if (!es.ok()) return es;
        if (res.rows.size() != idx.size()) return wire::Status::Fail(wire::ErrorCode::kBadMessage, "EVAL result with the wrong row count");
        out->insert(out->end(), res.rows.begin(), res.rows.end());
      }
      return wire::Status::Ok();
    };
    auto evaluate = [&](wire::Channel& chan) -> wire::Status {
      if (val.examples.empty()) return wire::Status::Ok();
      const auto n = static_cast<int64_t>(val.examples.size());
      const int64_t limit = c.eval_batches > 0 ? std::min(n, c.eval_batches * c.batch) : n;
      std::vector<wire::EvalResultMsg::Row> rows;
      wire::Status es = eval_rows(chan, val, limit, &rows);
      if (!es.ok()) return es;
      double nll = 0;
      uint64_t tokens = 0, correct = 0, exact = 0;
      for (const auto& r : rows) {
        nll += r.nll_sum;
        tokens += r.tokens;
        correct += r.correct;
        exact += r.tokens > 0 && r.correct == r.tokens;
      }
      const double loss = tokens ? nll / static_cast<double>(tokens) : 0.0;
      final_eval = {{"step", st.step},
                    {"loss", loss},
                    {"perplexity", std::exp(loss)},
                    {"token_accuracy", tokens ? static_cast<double>(correct) / static_cast<double>(tokens) : 0.0},
                    {"exact_match", rows.empty() ? 0.0 : static_cast<double>(exact) / static_cast<double>(rows.size())},
                    {"sequences", rows.size()},
                    {"tokens", tokens}};
      if (val.format == DataFormat::kClassification && !val.label_words.empty()) {
        // Every label word after every text, scored by the server; the likeliest word is the answer.
        Dataset cand;
        std::vector<std::string> gold;
        for (int64_t i = 0; i < limit; ++i) {
          const Example& e = val.examples[static_cast<size_t>(i)];
          size_t p = 0;
          while (p < e.labels.size() && e.labels[p] == kIgnoreLabel) ++p;
          std::vector<int64_t> answer(e.ids.begin() + static_cast<std::ptrdiff_t>(p), e.ids.end());
          if (!answer.empty() && answer.back() == tok->eos_id()) answer.pop_back();
          gold.push_back(tok->decode(answer));
          for (const std::string& w : val.label_words) {
            Example x;
            x.ids.assign(e.ids.begin(), e.ids.begin() + static_cast<std::ptrdiff_t>(p));
            x.labels.assign(p, kIgnoreLabel);
            auto word = tok->encode(" " + w);
            if (tok->eos_id() >= 0) word.push_back(tok->eos_id());
            x.ids.insert(x.ids.end(), word.begin(), word.end());
            x.labels.insert(x.labels.end(), word.begin(), word.end());
            cand.examples.push_back(std::move(x));
          }
        }
        std::vector<wire::EvalResultMsg::Row> scores;
        es = eval_rows(chan, cand, static_cast<int64_t>(cand.examples.size()), &scores);
        if (!es.ok()) return es;
        const size_t W = val.label_words.size();
        int64_t right = 0;
        for (size_t i = 0; i < gold.size(); ++i) {
          size_t best = 0;
          for (size_t w = 1; w < W; ++w) best = scores[i * W + w].nll_sum < scores[i * W + best].nll_sum ? w : best;
          right += " " + val.label_words[best] == gold[i];
        }
        final_eval["accuracy"] = gold.empty() ? 0.0 : static_cast<double>(right) / static_cast<double>(gold.size());
      }
      metrics.write({{"eval", final_eval}});
      return wire::Status::Ok();
    };
    auto checkpoint = [&](wire::Channel& chan, bool final) -> wire::Status {
      wire::Status cs = detail::send_control(chan, wire::ControlKind::kCheckpoint, {{"step", st.step}, {"final", final}});
      nlohmann::json reply;
      std::string blob;
      if (cs.ok()) cs = detail::expect(chan, wire::MessageType::kControl, std::chrono::minutes(10), &f);
      if (cs.ok()) cs = detail::parse_control(f, wire::ControlKind::kCheckpoint, &reply, &blob);
      if (!cs.ok()) return cs;
      if (!reply.value("ok", false) || reply.value("step", int64_t{-1}) != st.step) {
        return wire::Status::Fail(wire::ErrorCode::kBadMessage, "server did not confirm the checkpoint at step " + std::to_string(st.step));
      }
      NamedTensors tensors = st.side.state();
      {
        std::lock_guard<std::mutex> lock(rng_mutex());
        tensors.emplace_back("rng", cpu_rng_state());
      }
      CheckpointFiles files;
      if (st.gates) {
        tensors.emplace_back("amaq.gates", st.gates->gates.detach());
        files["gate_optim.pt"] = optimizer_bytes(*st.gate_opt);
      }
      detail::add_aqsgd_state(*st.fwd, &tensors);
      files["state.safetensors"] = safetensors_bytes(tensors);
      files["optim.pt"] = optimizer_bytes(*st.side.opt);
      files["state.json"] =
          nlohmann::json{{"step", st.step}, {"position", st.position}, {"run_id", run_id}, {"side", st.side.options.to_json()}}.dump(2);
      write_checkpoint(ckpt_root, st.step, files);
      prune_checkpoints(ckpt_root, c.keep_checkpoints);
      if (final) {  // the server's side options, and its LoRA when it trained one (full weights stay on the server)
        const std::string dir = join_path(c.run_dir, "server_adapter");
        make_dirs(dir);
        if (!blob.empty()) write_file_atomic(join_path(dir, "adapter_model.safetensors"), blob);
        write_file_atomic(join_path(dir, "side.json"), reply.at("side").dump(2) + "\n");
      }
      return wire::Status::Ok();
    };

    while (s.ok() && st.step < last) {
      const int64_t step = st.step;
      StepRecord rec;
      rec.step = step;
      rec.lr = c.schedule.lr_at(step);
      const auto t_step = Clock::now();
      const double blocked0 = ch->accounting().seconds_blocked;
      const wire::Accounting acc0 = ch->accounting();
      const uint64_t sent0 = acc0.bytes_sent(), recv0 = acc0.bytes_received();
      if (bwd_spec.codec == quant::CodecId::kAmaq) {
        const double b = quant::budget_at(bwd_spec, step);
        if (b != st.bwd_budget_sent) {
          s = detail::send_control(*ch, wire::ControlKind::kBitSync, {{"step", step}, {"budget", b}});
          if (!s.ok()) break;
          st.bwd_budget_sent = b;
        }
      }
      st.side.zero_grad();
      if (st.gate_opt) st.gate_opt->zero_grad();
      double server_sq = 0;
      BitsStats fwd_bits, bwd_bits;
      for (int64_t m = 0; m < M && s.ok(); ++m) {
        std::vector<int64_t> idx;
        for (int64_t i = 0; i < c.batch; ++i) idx.push_back(sampler.at(st.position + m * c.batch + i));
        Batch b = make_batch(train, idx, pad_id, pad_to);
        auto t0 = Clock::now();
        at::Tensor h = st.side.part->forward(b.ids, b.mask);
        quant::EncodeArgs args;
        args.sample_ids = b.sample_ids;
        args.seed = static_cast<uint64_t>(step * 1000003 + m);
        if (st.gates) args.bits = st.gates->bit_map();
        quant::Encoded e = st.fwd->encode(h, args);
        at::Tensor hq = quant::fake_quant(h, e, st.gates ? st.gates->bits_continuous() : at::Tensor());
        fwd_bits = stats_of(e.bits, nominal_fwd);
        rec.fwd_packet_bytes += e.packet.size();
        rec.elements += static_cast<uint64_t>(h.numel());
        rec.rows += static_cast<uint64_t>(b.ids.size(0));
        rec.cells += static_cast<uint64_t>(b.ids.numel());
        rec.tokens += b.mask.sum().item<int64_t>();
        const wire::ForwardMsg fm = forward_msg(step, m, b, std::move(e.packet), fwd_spec.codec == quant::CodecId::kAqsgd);
        rec.client_seconds += seconds_since(t0);
        s = ch->send({wire::MessageType::kForward, 0, fm.encode()});
        if (s.ok()) s = detail::expect(*ch, wire::MessageType::kBackward, std::chrono::minutes(10), &f);
        wire::BackwardMsg bm;
        if (s.ok()) s = wire::BackwardMsg::decode(f.payload, &bm);
        if (!s.ok()) break;
        if (bm.step != static_cast<uint64_t>(step) || bm.micro_batch != static_cast<uint32_t>(m)) {
          s = wire::Status::Fail(wire::ErrorCode::kBadMessage, "BACKWARD for another step or micro-batch");
          break;
        }
        t0 = Clock::now();
        rec.bwd_packet_bytes += bm.packet.size();
        at::Tensor dh;
        try {
          dh = st.bwd->decode(bm.packet);
        } catch (const Error& err) {
          s = wire::Status::Fail(wire::ErrorCode::kBadMessage, err.what());
          break;
        }
        if (dh.sizes() != h.sizes()) {
          s = wire::Status::Fail(wire::ErrorCode::kBadMessage, "gradient shape differs from the activation's");
          break;
        }
        bwd_bits = stats_of(bwd_spec.codec == quant::CodecId::kAmaq ? st.bwd->received_map() : at::Tensor(), nominal_bwd);
        // d(sum(hq * dh))/dhq = dh: the server's gradient enters the client's graph unchanged.
        at::Tensor surrogate = (hq * dh.to(hq.scalar_type())).sum();
        if (st.gates) {
          at::Tensor r = st.gates->regularization();
          rec.reg_loss = r.item<double>();
          surrogate = surrogate + st.gates->beta_at(step) / static_cast<double>(M) * r;
        }
        surrogate.backward();
        rec.client_seconds += seconds_since(t0);
        rec.task_loss += bm.loss / static_cast<double>(M);
        rec.server_seconds += bm.server_seconds;
        server_sq = bm.grad_sq_norm;
      }
      if (!s.ok()) break;
      const auto t0 = Clock::now();
      const double total_sq = st.side.grad_sq_norm() + server_sq;
      const double coef = clip_coefficient(total_sq, c.schedule.clip);
      s = detail::send_control(*ch, wire::ControlKind::kStep, {{"step", step}, {"lr", rec.lr}, {"coef", coef}});
      if (!s.ok()) break;
      st.side.step(rec.lr, coef);
      if (st.gate_opt) {
        st.gate_opt->step();
        if (st.gates->spec().mode == quant::BudgetMode::kGuaranteed) st.gates->project(st.gates->budget_at(step));
      }
      st.position += M * c.batch;
      st.step = step + 1;
      rec.client_seconds += seconds_since(t0);
      rec.grad_norm = std::sqrt(total_sq);
      rec.loss = rec.task_loss + (st.gates ? st.gates->spec().beta * rec.reg_loss : 0.0);
      rec.fwd_bits = fwd_bits;
      rec.bwd_bits = bwd_bits;
      rec.fwd_wire_bytes = ch->accounting().bytes_sent() - sent0;
      rec.bwd_wire_bytes = ch->accounting().bytes_received() - recv0;
      const auto fwd_type = static_cast<size_t>(wire::MessageType::kForward), bwd_type = static_cast<size_t>(wire::MessageType::kBackward);
      rec.forward_frame_bytes = ch->accounting().sent[fwd_type].bytes - acc0.sent[fwd_type].bytes;
      rec.backward_frame_bytes = ch->accounting().received[bwd_type].bytes - acc0.received[bwd_type].bytes;
      rec.network_seconds = std::max(0.0, ch->accounting().seconds_blocked - blocked0 - rec.server_seconds);
      rec.tokens_per_second = static_cast<double>(rec.tokens) / std::max(1e-9, seconds_since(t_step));
      metrics.write(rec.to_json());
      if (!c.quiet) progress.update(rec, ch->accounting().bytes_sent() + ch->accounting().bytes_received());
      const bool done = st.step == c.schedule.steps;
      if (c.eval_every > 0 && st.step % c.eval_every == 0 && !done) s = evaluate(*ch);
      if (s.ok() && (done || st.step == last || (c.checkpoint_every > 0 && st.step % c.checkpoint_every == 0))) {
        s = checkpoint(*ch, done);
      }
    }
    if (!c.quiet) progress.finish();
    if (s.ok() && st.step == c.schedule.steps) s = evaluate(*ch);
    if (s.ok()) {
      ch->send({wire::MessageType::kBye, 0, {}});
      ch->close();
      metrics.write({{"session", {{"bytes_sent", ch->accounting().bytes_sent()}, {"bytes_received", ch->accounting().bytes_received()}}}});
      RunResult out;
      out.steps = read_metrics(join_path(c.run_dir, "metrics.jsonl"));
      out.eval = final_eval;
      out.completed_steps = st.step;
      out.run_dir = c.run_dir;
      out.summary = summarize(out.steps, final_eval);
      write_file_atomic(join_path(c.run_dir, "summary.txt"), out.summary);
      if (st.gates) {  // the learned map, reusable as `fixed:map=FILE[,shuffle=SEED]` (the random-map ablation)
        const at::Tensor map = st.gates->bit_map().to(at::kLong).contiguous();
        const std::vector<int64_t> widths(map.data_ptr<int64_t>(), map.data_ptr<int64_t>() + map.numel());
        write_file_atomic(join_path(c.run_dir, "fwd_bit_map.json"), nlohmann::json(widths).dump() + "\n");
      }
      if (!c.quiet) std::fprintf(stderr, "%s", out.summary.c_str());
      return out;
    }
    ch->close();
    if (!is_link_failure(s) || attempts_left-- <= 0) {
      if (is_link_failure(s)) throw Error("lost the server at step " + std::to_string(st.step) + ": " + s.message, "rerun with --resume");
      refused(s);
    }
    spdlog::warn("lost the server at step {}: {}; reconnecting and resuming from the last checkpoint ({} attempts left)", st.step,
                 s.message, attempts_left + 1);
    std::this_thread::sleep_for(std::chrono::seconds(1));
    resume = !list_checkpoints(ckpt_root).empty();
    if (!resume) throw Error("lost the server before the first checkpoint: " + s.message, "start the run again (set --checkpoint-every)");
  }
}

std::vector<StepRecord> read_metrics(const std::string& path) {
  std::map<int64_t, StepRecord> by_step;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step") || !j.contains("fwd_bits")) continue;
    StepRecord r;
    r.step = j["step"];
    r.loss = j["loss"];
    r.task_loss = j["task_loss"];
    r.reg_loss = j["reg_loss"];
    r.lr = j["lr"];
    r.grad_norm = j["grad_norm"];
    for (auto [key, dst] : {std::pair{"fwd_bits", &r.fwd_bits}, std::pair{"bwd_bits", &r.bwd_bits}}) {
      dst->mean = j[key]["mean"];
      dst->min = j[key]["min"];
      dst->max = j[key]["max"];
    }
    r.fwd_wire_bytes = j["fwd_wire_bytes"];
    r.bwd_wire_bytes = j["bwd_wire_bytes"];
    r.fwd_packet_bytes = j["fwd_packet_bytes"];
    r.bwd_packet_bytes = j["bwd_packet_bytes"];
    r.forward_frame_bytes = j["forward_frame_bytes"];
    r.backward_frame_bytes = j["backward_frame_bytes"];
    r.elements = j["elements"];
    r.rows = j["rows"];
    r.cells = j["cells"];
    r.client_seconds = j["client_seconds"];
    r.server_seconds = j["server_seconds"];
    r.network_seconds = j["network_seconds"];
    r.tokens = j["tokens"];
    r.tokens_per_second = j["tokens_per_second"];
    by_step[r.step] = r;
  }
  std::vector<StepRecord> out;
  for (auto& [s, r] : by_step) out.push_back(r);
  return out;
}

std::string summarize(const std::vector<StepRecord>& steps, const nlohmann::json& eval) {
  if (steps.empty()) return "no steps recorded\n";
  uint64_t fwd = 0, bwd = 0, fwd_packet = 0, bwd_packet = 0, elements = 0;
  double fwd_bits = 0, bwd_bits = 0, fwd_tail = 0, bwd_tail = 0, client_s = 0, server_s = 0, net_s = 0;
  const size_t tail_from = steps.size() - std::max<size_t>(1, steps.size() / 10);
  for (size_t i = 0; i < steps.size(); ++i) {
    const StepRecord& r = steps[i];
    fwd += r.fwd_wire_bytes;
    bwd += r.bwd_wire_bytes;
    fwd_packet += r.fwd_packet_bytes;
    bwd_packet += r.bwd_packet_bytes;
    elements += r.elements;
    fwd_bits += r.fwd_bits.mean;
    bwd_bits += r.bwd_bits.mean;
    if (i >= tail_from) {
      fwd_tail += r.fwd_bits.mean / static_cast<double>(steps.size() - tail_from);
      bwd_tail += r.bwd_bits.mean / static_cast<double>(steps.size() - tail_from);
    }
    client_s += r.client_seconds;
    server_s += r.server_seconds;
    net_s += r.network_seconds;
  }
  const auto n = static_cast<double>(steps.size());
  const uint64_t bf16 = elements * 2;  // what a bf16 transport would have sent each way (packets only)
  std::vector<std::vector<std::string>> rows{{"", "forward", "backward"}};
  rows.push_back({"wire MB (frames)", fmt_mb(fwd), fmt_mb(bwd)});
  rows.push_back({"codec MB (packets)", fmt_mb(fwd_packet), fmt_mb(bwd_packet)});
  rows.push_back({"bf16 would send MB", fmt_mb(bf16), fmt_mb(bf16)});
  rows.push_back({"packets / bf16", fmt::format("{:.1f}%", 100.0 * static_cast<double>(fwd_packet) / static_cast<double>(std::max<uint64_t>(1, bf16))),
                  fmt::format("{:.1f}%", 100.0 * static_cast<double>(bwd_packet) / static_cast<double>(std::max<uint64_t>(1, bf16)))});
  rows.push_back({"effective bits/elem", fmt::format("{:.3f}", 8.0 * static_cast<double>(fwd_packet) / static_cast<double>(std::max<uint64_t>(1, elements))),
                  fmt::format("{:.3f}", 8.0 * static_cast<double>(bwd_packet) / static_cast<double>(std::max<uint64_t>(1, elements)))});
  rows.push_back({"mean bits (run)", fmt::format("{:.3f}", fwd_bits / n), fmt::format("{:.3f}", bwd_bits / n)});
  rows.push_back({"mean bits (last 10%)", fmt::format("{:.3f}", fwd_tail), fmt::format("{:.3f}", bwd_tail)});
  std::string out = fmt::format("\nsummary: {} steps, loss {:.4f} -> {:.4f}; compute client {:.1f} s, server {:.1f} s, network {:.1f} s\n",
                                steps.size(), steps.front().loss, steps.back().loss, client_s, server_s, net_s);
  out += format_table(rows);
  if (!eval.is_null() && !eval.empty()) {
    out += fmt::format("eval at step {}: loss {:.4f}, perplexity {:.3f}, token accuracy {:.2f}%, exact match {:.2f}% ({} sequences)\n",
                       eval["step"].get<int64_t>(), eval["loss"].get<double>(), eval["perplexity"].get<double>(),
                       100 * eval["token_accuracy"].get<double>(), 100 * eval["exact_match"].get<double>(),
                       eval["sequences"].get<uint64_t>());
  }
  return out;
}

}  // namespace amaq::train
