// A slow link between two processes on this machine, in user space: a TCP relay that forwards each
// direction of every connection through a model of a link: serialisation at the link's rate, a
// one-way propagation delay, and a bounded queue (a full queue stops reading, so the sender's TCP
// window closes as it would behind a real bottleneck). The kernel here has no netem; this is what
// `amaq emulate-link` runs and what the WAN measurements (docs/wan.md) go through. Packet loss is
// not modelled: the relay carries a byte stream, below which TCP has already recovered any loss
// (packet_link.h models it, at the packet level, where it can run).
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace amaq::wire {

struct LinkSpec {
  double rate_bits_per_second = 100e6;
  std::chrono::microseconds one_way_delay{10000};
  /// Bytes one direction may hold (in transit and queued); 0: twice the bandwidth-delay product,
  /// at least 1 MiB.
  uint64_t queue_bytes = 0;

  uint64_t queue_limit() const;
  /// "100mbit/20ms" (rate, round-trip time): what --link takes. Throws amaq::Error naming the part.
  static LinkSpec parse(const std::string& text);
  std::string to_string() const;
};

/// Listens on 127.0.0.1 (`listen_port`, 0 = any free port) and relays each connection to
/// `target_host:target_port` through the link. Runs until destroyed.
class LinkEmulator {
 public:
  LinkEmulator(uint16_t listen_port, const std::string& target_host, uint16_t target_port, LinkSpec spec);
  ~LinkEmulator();
  LinkEmulator(const LinkEmulator&) = delete;
  LinkEmulator& operator=(const LinkEmulator&) = delete;
  uint16_t port() const;
  /// The link's rate from now on, both directions (bytes already queued keep their times): a link
  /// that changes under a run.
  void set_rate(double bits_per_second);
  /// Bytes delivered so far, client to target and back.
  uint64_t bytes_forward() const;
  uint64_t bytes_backward() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace amaq::wire
