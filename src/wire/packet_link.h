// A slow, lossy link at the packet level: two network namespaces, each with a TUN device, and a
// delay line between them in this process. Each direction: serialisation at the link's rate, a
// one-way propagation delay, a bounded drop-tail queue, and random loss. The kernels' TCP runs over
// it as over a real path (retransmissions, congestion window), which the byte-stream relay
// (link_emulator.h) cannot show. Needs root, /dev/net/tun and iproute2's `ip`; `unavailable()`
// says why not. Everything it creates is gone when it is destroyed.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "wire/link_emulator.h"

namespace amaq::wire {

struct PacketLinkSpec {
  LinkSpec link;
  double loss = 0;    ///< probability that a packet is dropped, each direction
  uint64_t seed = 1;  ///< of the loss draws
};

class PacketLink {
 public:
  enum class End { kA, kB };
  static constexpr const char* kAddressA = "10.211.0.1";  ///< end A's address (the client side)
  static constexpr const char* kAddressB = "10.211.0.2";  ///< end B's address (the server side)

  /// Namespaces `<name>-a` and `<name>-b` (`ip netns exec` runs programs in them). Throws
  /// amaq::Error naming the step that failed.
  PacketLink(const std::string& name, PacketLinkSpec spec);
  ~PacketLink();
  PacketLink(const PacketLink&) = delete;
  PacketLink& operator=(const PacketLink&) = delete;

  std::string netns(End end) const;
  /// A socket(domain, type, 0) created inside `end`'s namespace (usable from any thread).
  int socket_in(End end, int domain, int type) const;
  /// A TCP connection across the link, no Nagle: {fd at end A (it connected), fd at end B (it
  /// accepted)}; the caller closes both. Throws amaq::Error naming the step that failed.
  std::pair<int, int> connect_tcp() const;
  /// Packets delivered and dropped (lost or over the queue), both directions together.
  uint64_t delivered() const;
  uint64_t dropped() const;

  /// Why this machine cannot run a PacketLink ("" when it can).
  static std::string unavailable();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace amaq::wire
