// SplitFed on one server (`amaq client --federation NAME`): the runs of a federation train one shared
// server side (its LoRA and AdamW) and average their client sides' trained tensors through the server
// (FedAvg, weighted by tokens) every --fed-every steps. Each run keeps its own codecs, client-side
// optimizer state, data and schedule; the server sees what a normal run sends plus the client's
// trained tensors at each averaging.
//
// The shared side steps once per round: when every member has sent the STEP of its current step,
// the members' gradients, each clipped by its own client's global coefficient and weighted by its
// labelled tokens (input tokens in a U-shaped run: the server never sees labels), are summed in
// run-id order and the side takes one AdamW step with the first member's learning rate. Until then
// a member's next FORWARD waits (its weights would not be the round's). Each member accumulates
// into its own gradients (swapped into the shared parameters for its micro-batches: a U-shaped
// member's around each TAIL_BACKWARD), so a member's gradient is what a dedicated server computes
// for it: with one member the federation is a normal run bit for bit, and two members with the same
// data and seed are, too (g/2 + g/2 = g in floating point).
//
// Membership: a run joins when its session opens and leaves when the session ends; a round completes
// once at least --fed-clients runs have joined and every current member has sent its STEP or waits
// for an average (members out of phase, after a resume, go on without deadlock). A member
// that drops mid-round leaves without its gradients; when it resumes it rejoins the federation's
// current shared side (the federation does not roll back for it). A federation whose last member
// leaves is forgotten, and a run resuming later starts it again from its own checkpoint.
#pragma once
#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "train/side.h"
#include "wire/frame.h"

namespace amaq::train {

/// sum_i weights[i] * tensors[i][key] for every key of the first, summed in the order given; a weight
/// of 1 multiplies nothing, so one member averages to itself exactly. Every member holds the same
/// keys and shapes (Federation::average checks each as it arrives).
std::map<std::string, at::Tensor> weighted_average(const std::vector<std::map<std::string, at::Tensor>>& tensors,
                                                   const std::vector<double>& weights);

class Federation {
 public:
  Federation(std::string name, int64_t expected) : name_(std::move(name)), expected_(expected) {}
  const std::string& name() const { return name_; }

  /// The shared server side; built by the first member on the compute thread (built() false until then).
  /// Touched only on the compute thread.
  Side side;
  bool built = false;

  /// Adds `run_id` as a member; refused when it expects another member count than the federation.
  wire::Status join(const std::string& run_id, int64_t expected);
  /// Removes the member (its unfinished round's gradients dropped); returns the members left.
  size_t leave(const std::string& run_id);

  // On the compute thread, around a member's micro-batch: its gradients in the shared parameters
  // (install), and back out (uninstall), with the tokens it trained on (labelled; U-shaped: input).
  void install(const std::string& run_id);
  void uninstall(const std::string& run_id, int64_t tokens);

  /// STEP of a member: its gradients are final for this round, clipped by `coef`; `lr` is the learning
  /// rate its schedule asks for.
  void submit_step(const std::string& run_id, double lr, double coef);
  /// Waits until the round the member's last STEP belongs to is complete (at once when it has none
  /// pending). Fails with kFederation after `timeout`, or kShutdown when `stopping` turns true.
  wire::Status wait_step(const std::string& run_id, std::chrono::milliseconds timeout,
                         const std::atomic<bool>& stopping);
  /// On the compute thread: the combined steps of completed rounds not taken yet.
  void take_pending_steps();

  /// FedAvg: submits the member's client tensors with its token weight and waits for the average of
  /// every member's (kFederation after `timeout`, kShutdown when stopping; kBadMessage when the
  /// tensors do not match the other members').
  wire::Status average(const std::string& run_id, std::map<std::string, at::Tensor> tensors, int64_t tokens,
                       std::chrono::milliseconds timeout, const std::atomic<bool>& stopping,
                       std::shared_ptr<const std::string>* averaged);

  size_t members();

 private:
  struct Member {
    std::vector<at::Tensor> grads;  // this round's, one per parameter of the shared side
    int64_t tokens = 0;             // tokens behind them (labelled; U-shaped: input)
    bool stepped = false;           // STEP sent for this round
    double lr = 0, coef = 1;
    int64_t round = 0;  // the round its STEP belongs to
    bool averaging = false;
    std::map<std::string, at::Tensor> avg_tensors;
    int64_t avg_tokens = 0;
  };
  struct Contribution {
    std::vector<at::Tensor> grads;
    double coef = 1, weight = 1;
  };
  struct PendingStep {
    std::vector<Contribution> parts;
    double lr = 0;
  };
  std::vector<at::Tensor> params();  // the shared side's, in its optimizer's order
  bool quorum() const { return static_cast<int64_t>(joined_.size()) >= expected_ && !members_.empty(); }
  void maybe_complete_round();    // under mu_
  void maybe_complete_average();  // under mu_
  wire::Status wait(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout,
                    const std::atomic<bool>& stopping, const std::function<bool()>& done, const std::string& what);

  const std::string name_;
  const int64_t expected_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, Member> members_;  // by run id: the order rounds and averages sum in
  std::set<std::string> joined_;           // runs that ever joined
  int64_t rounds_ = 0, averages_ = 0;      // completed
  std::deque<PendingStep> pending_;
  std::shared_ptr<const std::string> averaged_;             // the last average, as safetensors bytes
  std::map<std::string, std::vector<int64_t>> avg_shapes_;  // what every member's tensors must be
};

}  // namespace amaq::train
