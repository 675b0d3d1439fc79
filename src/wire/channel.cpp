#include "wire/channel.h"

#include <cstring>
#include <deque>

namespace amaq::wire {

std::string error_payload(const Status& s) {
  std::string out(2, '\0');
  uint16_t code = static_cast<uint16_t>(s.code);
  std::memcpy(out.data(), &code, 2);
  return out + s.message;
}

Status parse_error_payload(const std::string& payload) {
  if (payload.size() < 2) return Status::Fail(ErrorCode::kBadMessage, "ERROR frame without a code");
  uint16_t code;
  std::memcpy(&code, payload.data(), 2);
  return Status::Fail(static_cast<ErrorCode>(code), payload.substr(2));
}

void refuse(Channel& channel, const Status& why) {
  channel.record_error(why);
  channel.send({MessageType::kError, 0, error_payload(why)});
  channel.close();
}

uint64_t Accounting::bytes_sent() const {
  uint64_t n = 0;
  for (const auto& c : sent) n += c.bytes;
  return n;
}

uint64_t Accounting::bytes_received() const {
  uint64_t n = 0;
  for (const auto& c : received) n += c.bytes;
  return n;
}

void Accounting::count_sent(MessageType t, uint64_t bytes) {
  sent[static_cast<uint8_t>(t)].frames++;
  sent[static_cast<uint8_t>(t)].bytes += bytes;
}

void Accounting::count_received(MessageType t, uint64_t bytes) {
  received[static_cast<uint8_t>(t)].frames++;
  received[static_cast<uint8_t>(t)].bytes += bytes;
}

Status Channel::send(const Frame& frame) {
  std::lock_guard<std::mutex> lock(send_mu_);
  Status s = send_frame(frame);
  record_error(s);
  return s;
}

Status Channel::receive(Frame* frame, std::chrono::milliseconds idle_timeout) {
  while (true) {
    Status s = receive_frame(frame, idle_timeout);
    record_error(s);
    if (!s.ok() || frame->type != MessageType::kHeartbeat) return s;
  }
}

HeartbeatScope::HeartbeatScope(Channel& channel, std::chrono::milliseconds interval) : channel_(channel) {
  thread_ = std::thread([this, interval] {
    std::unique_lock<std::mutex> lock(mu_);
    while (!cv_.wait_for(lock, interval, [this] { return stop_; })) {
      if (!channel_.send({MessageType::kHeartbeat, 0, ""}).ok()) return;
    }
  });
}

HeartbeatScope::~HeartbeatScope() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

namespace {

// One direction: a queue of encoded frames.
struct Pipe {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> bytes;
  bool closed = false;
};

class InProcessChannel : public Channel {
 public:
  InProcessChannel(std::shared_ptr<Pipe> out, std::shared_ptr<Pipe> in, uint64_t max_payload)
      : out_(std::move(out)), in_(std::move(in)), decoder_(max_payload) {}
  ~InProcessChannel() override { close(); }

  Status send_frame(const Frame& frame) override {
    std::string bytes = encode_frame(frame);
    const uint64_t n = bytes.size();
    {
      std::lock_guard<std::mutex> lock(out_->mu);
      if (out_->closed) return Status::Fail(ErrorCode::kClosed, "peer closed the in-process channel");
      out_->bytes.push_back(std::move(bytes));
    }
    out_->cv.notify_one();
    accounting_.count_sent(frame.type, n);
    return Status::Ok();
  }

  Status receive_frame(Frame* frame, std::chrono::milliseconds timeout) override {
    const auto t0 = std::chrono::steady_clock::now();
    while (!decoder_.next(frame)) {
      std::string bytes;
      {
        std::unique_lock<std::mutex> lock(in_->mu);
        if (!in_->cv.wait_until(lock, t0 + timeout, [&] { return !in_->bytes.empty() || in_->closed; })) {
          accounting_.seconds_blocked += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          return Status::Fail(ErrorCode::kTimeout, "no frame within " + std::to_string(timeout.count()) + " ms");
        }
        if (in_->bytes.empty()) return Status::Fail(ErrorCode::kClosed, "peer closed the in-process channel");
        bytes = std::move(in_->bytes.front());
        in_->bytes.pop_front();
      }
      Status s = decoder_.feed(bytes);
      if (!s.ok()) return s;
    }
    accounting_.seconds_blocked += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    accounting_.count_received(frame->type, sizeof(FrameHeader) + frame->payload.size());
    return Status::Ok();
  }

  void close() override {
    for (auto* p : {out_.get(), in_.get()}) {
      {
        std::lock_guard<std::mutex> lock(p->mu);
        p->closed = true;
      }
      p->cv.notify_all();
    }
  }

 private:
  std::shared_ptr<Pipe> out_, in_;
  FrameDecoder decoder_;
};

}  // namespace

std::pair<std::unique_ptr<Channel>, std::unique_ptr<Channel>> make_in_process_pair(uint64_t max_payload_bytes) {
  auto a = std::make_shared<Pipe>(), b = std::make_shared<Pipe>();
  return {std::make_unique<InProcessChannel>(a, b, max_payload_bytes),
          std::make_unique<InProcessChannel>(b, a, max_payload_bytes)};
}

}  // namespace amaq::wire
