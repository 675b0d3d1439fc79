#include "train/federation.h"

#include "core/error.h"
#include "core/safetensors.h"

namespace amaq::train {

std::map<std::string, at::Tensor> weighted_average(const std::vector<std::map<std::string, at::Tensor>>& tensors,
                                                   const std::vector<double>& weights) {
  TORCH_CHECK(!tensors.empty() && tensors.size() == weights.size(), "expected one weight per member, got ",
              weights.size(), " for ", tensors.size());
  at::NoGradGuard no_grad;
  std::map<std::string, at::Tensor> out;
  for (const auto& [key, first] : tensors[0]) {
    at::Tensor sum;
    for (size_t i = 0; i < tensors.size(); ++i) {
      at::Tensor t = tensors[i].at(key);
      if (weights[i] != 1.0) t = t * weights[i];
      sum = sum.defined() ? sum + t : t.clone();
    }
    out.emplace(key, std::move(sum));
  }
  return out;
}

wire::Status Federation::join(const std::string& run_id, int64_t expected) {
  std::lock_guard<std::mutex> lock(mu_);
  if (expected != expected_) {
    return wire::Status::Fail(wire::ErrorCode::kFederation, "federation " + name_ + " waits for " +
                                                                std::to_string(expected_) + " clients, this run for " +
                                                                std::to_string(expected) +
                                                                "\n  hint: give every member the same --fed-clients");
  }
  if (members_.count(run_id)) {
    return wire::Status::Fail(wire::ErrorCode::kFederation,
                              "run " + run_id + " is a member of federation " + name_ + " already");
  }
  members_[run_id].round = rounds_;
  joined_.insert(run_id);
  cv_.notify_all();
  return wire::Status::Ok();
}

size_t Federation::leave(const std::string& run_id) {
  std::lock_guard<std::mutex> lock(mu_);
  members_.erase(run_id);
  maybe_complete_round();
  maybe_complete_average();
  cv_.notify_all();
  return members_.size();
}

std::vector<at::Tensor> Federation::params() {
  std::vector<at::Tensor> out;
  for (const auto& group : side.opt->param_groups())
    for (const auto& p : group.params()) out.push_back(p);
  return out;
}

void Federation::install(const std::string& run_id) {
  std::vector<at::Tensor> ps = params();
  std::lock_guard<std::mutex> lock(mu_);
  Member& m = members_.at(run_id);
  m.grads.resize(ps.size());
  for (size_t i = 0; i < ps.size(); ++i) ps[i].mutable_grad() = std::move(m.grads[i]);
}

void Federation::uninstall(const std::string& run_id, int64_t tokens) {
  std::vector<at::Tensor> ps = params();
  std::lock_guard<std::mutex> lock(mu_);
  Member& m = members_.at(run_id);
  m.grads.resize(ps.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    m.grads[i] = ps[i].grad();
    ps[i].mutable_grad() = at::Tensor();
  }
  m.tokens += tokens;
}

void Federation::submit_step(const std::string& run_id, double lr, double coef) {
  std::lock_guard<std::mutex> lock(mu_);
  Member& m = members_.at(run_id);
  m.stepped = true;
  m.lr = lr;
  m.coef = coef;
  m.round = rounds_;
  maybe_complete_round();
}

void Federation::maybe_complete_round() {
  if (!quorum()) return;
  // A member waiting for an average between its steps sits the round out (it has nothing to add,
  // and members out of phase, after a resume, would otherwise wait for each other forever).
  int64_t stepped = 0, total = 0;
  for (const auto& [id, m] : members_) {
    if (!m.stepped && !m.averaging) return;  // still computing this round
    stepped += m.stepped;
    total += m.stepped ? m.tokens : 0;
  }
  if (stepped == 0) return;
  PendingStep p;
  for (auto& [id, m] : members_) {
    if (!m.stepped) continue;
    if (p.parts.empty()) p.lr = m.lr;
    // Weighted by labelled tokens (equally when a round had none); one member weighs exactly 1.
    const double w =
        total > 0 ? static_cast<double>(m.tokens) / static_cast<double>(total) : 1.0 / static_cast<double>(stepped);
    p.parts.push_back({std::move(m.grads), m.coef, w});
    m.grads.clear();
    m.tokens = 0;
    m.stepped = false;
  }
  pending_.push_back(std::move(p));
  ++rounds_;
  cv_.notify_all();
}

wire::Status Federation::wait(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout,
                              const std::atomic<bool>& stopping, const std::function<bool()>& done,
                              const std::string& what) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (stopping) return wire::Status::Fail(wire::ErrorCode::kShutdown, "the server is stopping");
    if (cv_.wait_until(lock, std::min(deadline, std::chrono::steady_clock::now() + std::chrono::milliseconds(200))) ==
            std::cv_status::timeout &&
        std::chrono::steady_clock::now() >= deadline && !done()) {
      std::string missing;
      for (const auto& [id, m] : members_) missing += (missing.empty() ? "" : ", ") + id;
      return wire::Status::Fail(
          wire::ErrorCode::kFederation,
          "federation " + name_ + ": " + what + " did not happen within " + std::to_string(timeout.count() / 1000) +
              " s (" + std::to_string(joined_.size()) + " of " + std::to_string(expected_) +
              " clients joined; members now: " + missing +
              ")\n  hint: start every member (--fed-clients counts them) and check that none is stuck");
    }
  }
  return wire::Status::Ok();
}

wire::Status Federation::wait_step(const std::string& run_id, std::chrono::milliseconds timeout,
                                   const std::atomic<bool>& stopping) {
  std::unique_lock<std::mutex> lock(mu_);
  const Member& m = members_.at(run_id);
  if (!m.stepped) return wire::Status::Ok();
  const int64_t round = m.round;
  return wait(
      lock, timeout, stopping, [&] { return rounds_ > round; }, "step " + std::to_string(round));
}

void Federation::take_pending_steps() {
  std::deque<PendingStep> todo;
  {
    std::lock_guard<std::mutex> lock(mu_);
    todo.swap(pending_);
  }
  if (todo.empty()) return;
  std::vector<at::Tensor> ps = params();
  at::NoGradGuard no_grad;
  for (PendingStep& p : todo) {
    // Each member's gradient clipped by its own coefficient and weighted, summed in run-id order:
    // what one member's dedicated server computes when it is the only one.
    std::vector<at::Tensor> sum(ps.size());
    for (Contribution& c : p.parts) {
      for (size_t i = 0; i < c.grads.size() && i < ps.size(); ++i) {
        at::Tensor& g = c.grads[i];
        if (!g.defined()) continue;
        if (c.coef != 1.0) g.mul_(c.coef);
        if (c.weight != 1.0) g.mul_(c.weight);
        if (sum[i].defined())
          sum[i].add_(g);
        else
          sum[i] = g;
      }
    }
    for (size_t i = 0; i < ps.size(); ++i) ps[i].mutable_grad() = sum[i];
    side.step(p.lr, 1.0);
    for (auto& t : ps) t.mutable_grad() = at::Tensor();
  }
}

wire::Status Federation::average(const std::string& run_id, std::map<std::string, at::Tensor> tensors, int64_t tokens,
                                 std::chrono::milliseconds timeout, const std::atomic<bool>& stopping,
                                 std::shared_ptr<const std::string>* averaged) {
  std::unique_lock<std::mutex> lock(mu_);
  if (avg_shapes_.empty()) {
    for (const auto& [k, t] : tensors) avg_shapes_[k] = t.sizes().vec();
  }
  std::string mismatch;
  if (tensors.size() != avg_shapes_.size()) mismatch = std::to_string(tensors.size()) + " tensors";
  for (auto it = tensors.begin(); mismatch.empty() && it != tensors.end(); ++it) {
    const auto want = avg_shapes_.find(it->first);
    if (want == avg_shapes_.end() || want->second != it->second.sizes().vec() ||
        it->second.scalar_type() != at::kFloat) {
      mismatch = "tensor '" + it->first + "' (" + c10::str(it->second.sizes()) + ", " +
                 c10::str(it->second.scalar_type()) + ")";
    }
  }
  if (!mismatch.empty()) {
    return wire::Status::Fail(wire::ErrorCode::kBadMessage,
                              "federation " + name_ + ": this client's " + mismatch +
                                  " does not match the other members' client sides (" +
                                  std::to_string(avg_shapes_.size()) +
                                  " fp32 tensors)\n  hint: every member needs the same model, split and client LoRA");
  }
  Member& m = members_.at(run_id);
  m.avg_tensors = std::move(tensors);
  m.avg_tokens = tokens;
  m.averaging = true;
  const int64_t round = averages_;
  maybe_complete_average();
  maybe_complete_round();
  return wait(
      lock, timeout, stopping,
      [&] {
        if (averages_ <= round) return false;
        *averaged = averaged_;
        return true;
      },
      "averaging " + std::to_string(round));
}

void Federation::maybe_complete_average() {
  if (!quorum()) return;
  for (const auto& [id, m] : members_)
    if (!m.averaging) return;
  int64_t total = 0;
  for (const auto& [id, m] : members_) total += m.avg_tokens;
  std::vector<std::map<std::string, at::Tensor>> all;
  std::vector<double> weights;
  for (auto& [id, m] : members_) {
    all.push_back(std::move(m.avg_tensors));
    weights.push_back(total > 0 ? static_cast<double>(m.avg_tokens) / static_cast<double>(total)
                                : 1.0 / static_cast<double>(members_.size()));
    m.avg_tensors.clear();
    m.averaging = false;
  }
  NamedTensors named;
  for (auto& [k, t] : weighted_average(all, weights)) named.emplace_back(k, std::move(t));
  averaged_ = std::make_shared<const std::string>(safetensors_bytes(named));
  ++averages_;
  cv_.notify_all();
}

size_t Federation::members() {
  std::lock_guard<std::mutex> lock(mu_);
  return members_.size();
}

}  // namespace amaq::train
