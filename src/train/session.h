// A split fine-tuning run, end to end. The client owns the data and the schedule and drives every
// step; the server serves one session per client connection. The session protocol (docs/protocol.md
// "Training session"):
//
//   handshake (HELLO ... HELLO_ACK)
//   client -> CONTROL SCHEDULE {run_id, resume_step, schedule, batch, seq_len}
//   server -> CONTROL SCHEDULE {resume_step, server side}   or ERROR (e.g. no checkpoint at that step)
//   per optimizer step s:
//     [client -> CONTROL BIT_SYNC {step, budget}]            backward AMAQ budget, when it changes
//     per micro-batch m: client -> FORWARD, server -> BACKWARD {loss, grad_sq_norm, server_seconds}
//       U-shaped split (--tail-split): client -> FORWARD (no labels), server -> TAIL_FORWARD,
//       client -> TAIL_BACKWARD, server -> BACKWARD {grad_sq_norm, server_seconds} (loss 0)
//     client -> CONTROL STEP {step, lr, coef}                 both sides clip by `coef` and step
//     [client -> CONTROL FED_AVG {step, tokens} + client tensors, server -> CONTROL FED_AVG + average]
//                                                             --federation, every --fed-every steps
//     [client -> EVAL, server -> EVAL result]                 periodic evaluation
//                                                             (U-shaped: server -> TAIL_FORWARD, scored by the client)
//     [client -> CONTROL CHECKPOINT {step, final}, server -> CONTROL CHECKPOINT {ok} (+ adapter blob)]
//   client -> BYE
//
// Clipping is global: the server reports its squared gradient norm with the last micro-batch's
// BACKWARD, the client adds its own and sends the coefficient, exactly as clip_grad_norm_ over the
// unsplit model's parameters.
#pragma once
#include <atomic>
#include <chrono>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/safetensors.h"
#include "model/config.h"
#include "quant/spec.h"
#include "train/metrics.h"
#include "train/options.h"
#include "wire/channel.h"
#include "wire/tcp.h"

namespace amaq::train {

class Federation;

struct ServerConfig {
  std::string model;  ///< HF model directory
  int64_t split = 0;
  /// U-shaped split: this server holds layers [split, tail_split) and never sees labels or the loss;
  /// the client holds [0, split) and [tail_split, L) with the head (0: the server holds [split, L)).
  int64_t tail_split = 0;
  quant::CodecSpec tail_fwd_codec, tail_bwd_codec;  ///< at the tail split: activations to the client, gradients back
  std::string run_dir;                              ///< one subdirectory per client run id (checkpoints, metrics)
  SideOptions side;
  quant::CodecSpec fwd_codec, bwd_codec;  ///< parsed by the app (none:fp32 by default)
  bool client_codecs = false;             ///< serve each run with the codecs its client asks for
  int64_t max_runs = 0;                   ///< runs trained at once; more are told to retry (0: no limit)
  uint64_t run_memory_budget = 0;         ///< bytes all live runs may own together (0: no limit)
  std::string token;                      ///< empty: no authentication
  int keep_checkpoints = 3;
  std::chrono::milliseconds idle_timeout{std::chrono::minutes(10)};
  std::chrono::milliseconds handshake_timeout{std::chrono::seconds(30)};
};

class TrainServer {
 public:
  class Session;
  explicit TrainServer(ServerConfig cfg);
  ~TrainServer();
  /// Serves one client session from HELLO to BYE. Never throws: a failure is logged in one line,
  /// told to the client when it can be, and returned.
  wire::Status serve(wire::Channel& ch, uint64_t session_id);
  /// The same for a session the TCP server authenticated already (context.hello set).
  wire::Status serve(wire::Channel& ch, const wire::SessionContext& context);
  /// TCP server options for this server: its frame limit, and its handshake run before a client
  /// gets a session (wire::ServerOptions::handshake).
  wire::ServerOptions tcp_options(uint16_t port) const;
  /// The frame limit for this model with the batch shapes a client may send.
  uint64_t max_payload() const;
  uint64_t steps_served() const { return steps_served_; }
  /// What one run's server side owns (its adapter, their gradients, AdamW's moments), estimated.
  uint64_t run_bytes() const { return run_bytes_; }
  /// Admission so far: the most runs live at once, and runs told to retry (busy) or refused (over budget).
  struct Admissions {
    int64_t live = 0, peak = 0, busy = 0, over_budget = 0;
    uint64_t live_bytes = 0;
  };

  /// A live run as the status page shows it (updated at each optimizer step).
  struct RunStatus {
    std::string run_id, fwd_codec, bwd_codec;
    std::string federation;  ///< "" : none
    uint64_t session = 0;
    int64_t step = 0, steps = 0;
    uint64_t bytes_in = 0, bytes_out = 0;  ///< frames received and sent by its session, headers included
    uint64_t fwd_packet_bytes = 0, bwd_packet_bytes = 0;
    uint64_t elements = 0;                    ///< of the activations sent so far (their gradients have as many)
    uint64_t micro_batches = 0;               ///< served so far in this session
    double seconds_sum = 0, seconds_max = 0;  ///< server time per micro-batch (as Latency measures it)
  };
  /// Server latency of a micro-batch (FORWARD received to BACKWARD ready, waiting for the compute
  /// thread included), over all runs: counts per upper bound in seconds, as a Prometheus histogram.
  struct Latency {
    static constexpr double kBounds[] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
    uint64_t counts[std::size(kBounds)] = {};  ///< observations <= each bound (cumulative)
    uint64_t count = 0;
    double sum = 0;
  };
  struct Status {
    Admissions admissions;
    std::vector<RunStatus> runs;
    Latency latency;
    uint64_t steps_served = 0, shared_base_bytes = 0;
  };
  Status status();
  /// SIGTERM: every session stops at its next step boundary. The client is told (CONTROL kStop)
  /// instead of getting its next BACKWARD; it may still checkpoint that step and say BYE.
  void request_stop() { stopping_ = true; }

 private:
  wire::ServerPolicy policy() const;

  ServerConfig cfg_;
  ModelConfig model_;
  std::unique_ptr<CheckpointReader> ckpt_;
  std::string fingerprint_;
  /// The server part's frozen weights, loaded once (on the compute thread, by the first run that
  /// needs them) and shared read-only by every LoRA run.
  const std::map<std::string, at::Tensor>& shared_base();
  std::mutex base_mu_;
  std::map<std::string, at::Tensor> base_;
  std::atomic<uint64_t> base_bytes_{0};  // of base_, once loaded (the status page does not wait for a load)
  uint64_t run_bytes_ = 0;  // what one run's server side owns (owned_bytes_estimate: the same for every run)
  // Admission: runs live now and the memory they own (estimated when each was admitted).
  std::mutex admit_mu_;  // guards what follows
  Admissions admissions_;
  std::map<uint64_t, RunStatus> run_status_;  // by session id
  Latency latency_;
  std::mutex runs_mu_;
  std::map<std::string, std::shared_ptr<std::timed_mutex>> runs_;  // one session per run at a time
  // SplitFed: the federations with members, by name (train/federation.h).
  wire::Status join_federation(const std::string& name, int64_t clients, const std::string& run_id,
                               std::shared_ptr<Federation>* out);
  void leave_federation(const std::shared_ptr<Federation>& fed, const std::string& run_id);
  std::mutex fed_mu_;
  std::map<std::string, std::shared_ptr<Federation>> federations_;
  std::atomic<uint64_t> steps_served_{0};
  std::atomic<bool> stopping_{false};
};

struct ClientConfig {
  std::string model;
  int64_t split = 0;
  int64_t tail_split = 0;  ///< U-shaped split: this side also holds [tail_split, L), the head and the loss
  quant::CodecSpec tail_fwd_codec, tail_bwd_codec;  ///< at the tail split: activations from the server, gradients back
  std::string run_dir;
  std::string data, val_data;
  std::string tokenizer = "auto";  ///< "auto": the model directory's tokenizer
  double val_fraction = 0.0;       ///< hold out this fraction of `data` when no val_data
  int64_t batch = 8;               ///< sequences per micro-batch
  int64_t in_flight = 1;           ///< micro-batches whose activations travel while the next is computed
  int64_t seq_len = 128;
  bool beyond_positions = false;  ///< allow seq_len > the model's max_position_embeddings (RoPE extrapolation)
  SideOptions side;
  Schedule schedule;
  quant::CodecSpec fwd_codec, bwd_codec;  ///< parsed by the app (none:fp32 by default)
  std::string token;
  int64_t checkpoint_every = 0;  ///< 0: only at the end
  int keep_checkpoints = 3;
  int64_t eval_every = 0;    ///< 0: only at the end (when there is validation data)
  int64_t eval_batches = 0;  ///< 0: the whole validation set
  bool resume = false;
  int64_t stop_after = -1;  ///< leave after this many steps as if interrupted (tests)
  std::string federation;   ///< SplitFed: share the server side with the runs of this federation ("" : none)
  int64_t fed_every = 1;    ///< average the client side with the federation every this many steps (and at the end)
  int64_t fed_clients = 1;  ///< members the federation waits for before its first step
  int retries = 3;          ///< reconnects (resuming from the last checkpoint) after a dropped link
  double busy_wait = 600;   ///< seconds a busy server is waited for, asking again with back-off
  bool quiet = false;
  bool progress_bar = false;                                  ///< force the bar even when stderr is not a terminal
  std::vector<std::pair<std::string, std::string>> resolved;  ///< the resolved options, for the table
};

struct RunResult {
  std::vector<StepRecord> steps;  ///< every step of the run (from metrics.jsonl, resumed parts included)
  nlohmann::json eval;            ///< final evaluation (empty without validation data)
  int64_t completed_steps = 0;
  std::string run_dir;
  std::string summary;  ///< the summary table printed at the end
};

/// U-shaped split: the codecs at the tail split go together (quant::Link::validate), and budget=auto
/// is given to both codecs of a direction or to neither (up: --fwd-codec and --tail-bwd-codec; down:
/// --bwd-codec and --tail-fwd-codec): it chooses one budget per direction. Throws amaq::Error naming them.
void check_tail_codecs(const quant::CodecSpec& fwd, const quant::CodecSpec& bwd, const quant::CodecSpec& tail_fwd,
                       const quant::CodecSpec& tail_bwd);

/// Opens a channel to the server (TCP/TLS or in-process).
using Connector = std::function<wire::Status(std::unique_ptr<wire::Channel>*)>;

class ClientTrainer {
 public:
  explicit ClientTrainer(ClientConfig cfg);
  ~ClientTrainer();
  /// The whole run (or up to stop_after). Reconnects up to `retries` times after a dropped
  /// connection, resuming from the last checkpoint; a refusal (auth, model, split, codec, resume)
  /// throws amaq::Error naming it.
  RunResult run(const Connector& connect);

 private:
  class Run;
  ClientConfig cfg_;
};

}  // namespace amaq::train
