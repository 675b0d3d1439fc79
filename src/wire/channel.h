// A Channel moves frames between the two sides. Implementations: in-process (two queues of encoded
// bytes, for single-process runs and tests) and TCP/TLS. Both move the same bytes, so the same
// accounting holds. Operations return a Status; nothing throws through a session loop.
#pragma once
#include <array>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "wire/frame.h"

namespace amaq::wire {

/// Bytes and frames per direction and message type, plus time spent blocked on the peer.
struct Accounting {
  struct Counts {
    uint64_t frames = 0;
    uint64_t bytes = 0;  ///< header included
  };
  std::array<Counts, kMaxMessageType + 1> sent{}, received{};
  double seconds_blocked = 0;  ///< waiting in receive()

  uint64_t bytes_sent() const;
  uint64_t bytes_received() const;
  void count_sent(MessageType t, uint64_t bytes);
  void count_received(MessageType t, uint64_t bytes);
};

class Channel {
 public:
  virtual ~Channel() = default;
  /// Sends one frame (callers on two threads are serialised).
  Status send(const Frame& frame);
  /// The next frame other than a HEARTBEAT. `idle_timeout` is the longest silence accepted: every
  /// heartbeat from the peer starts it again, so a peer that is busy computing but alive is waited for.
  Status receive(Frame* frame, std::chrono::milliseconds idle_timeout);
  virtual void close() = 0;
  const Accounting& accounting() const { return accounting_; }
  /// The first failure of this channel (a send, a receive, or the reason given to refuse()).
  Status first_error() const {
    std::lock_guard<std::mutex> lock(error_mu_);
    return first_error_;
  }
  /// Keeps `s` if it is the first failure (from any thread: a heartbeat may send while another receives).
  void record_error(const Status& s) {
    if (s.ok()) return;
    std::lock_guard<std::mutex> lock(error_mu_);
    if (first_error_.ok()) first_error_ = s;
  }

 protected:
  virtual Status send_frame(const Frame& frame) = 0;
  virtual Status receive_frame(Frame* frame, std::chrono::milliseconds timeout) = 0;
  Accounting accounting_;

 private:
  std::mutex send_mu_;
  mutable std::mutex error_mu_;
  Status first_error_;
};

/// While alive, sends a HEARTBEAT every `interval` from a helper thread. Scope it around work
/// during which its owner does not use the channel (the server computing a step), so the peer
/// blocked in receive() knows this side is alive.
class HeartbeatScope {
 public:
  HeartbeatScope(Channel& channel, std::chrono::milliseconds interval);
  ~HeartbeatScope();
  HeartbeatScope(const HeartbeatScope&) = delete;
  HeartbeatScope& operator=(const HeartbeatScope&) = delete;

 private:
  Channel& channel_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

/// Best effort: tells the peer why with an ERROR frame, then closes.
void refuse(Channel& channel, const Status& why);
/// ERROR payload: u16 code + text.
std::string error_payload(const Status& s);
Status parse_error_payload(const std::string& payload);

/// Two connected in-process channels. Frames are encoded and decoded exactly as on a socket
/// (checksums, size limit), so byte accounting matches the TCP channel's.
std::pair<std::unique_ptr<Channel>, std::unique_ptr<Channel>> make_in_process_pair(uint64_t max_payload_bytes);

}  // namespace amaq::wire
