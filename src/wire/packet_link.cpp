#include "wire/packet_link.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/runtime.h"

namespace amaq::wire {
namespace {

using Clock = std::chrono::steady_clock;
constexpr const char* kDevice = "amaq0";

// Runs `ip ARGS...` with its output discarded; its exit code (127: it could not start).
int run_ip(const std::vector<std::string>& args) {
  std::vector<std::string> all{"ip"};
  all.insert(all.end(), args.begin(), args.end());
  try {
    return wait_process(spawn_process(all, "/dev/null"));
  } catch (const Error&) {
    return 127;
  }
}

void ip_or_throw(const std::vector<std::string>& args) {
  if (run_ip(args) == 0) return;
  std::string cmd = "ip";
  for (const auto& a : args) cmd += " " + a;
  throw Error("`" + cmd + "` failed", "the packet-level link needs root and iproute2 (apt-get install iproute2)");
}

// Runs `fn` on a thread that has joined namespace `ns` (this thread's namespace is left alone):
// sockets and TUN devices it opens belong to that namespace.
int in_netns(const std::string& ns, const std::function<int()>& fn, std::string* why) {
  int out = -1;
  std::thread t([&] {
    const int nsfd = ::open(("/var/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
    if (nsfd < 0 || ::setns(nsfd, CLONE_NEWNET) != 0) {
      *why = "cannot enter network namespace " + ns + ": " + std::strerror(errno);
      if (nsfd >= 0) ::close(nsfd);
      return;
    }
    ::close(nsfd);
    out = fn();
    if (out < 0) *why = std::strerror(errno);
  });
  t.join();
  return out;
}

}  // namespace

struct PacketLink::Impl {
  PacketLinkSpec spec;
  std::string name;
  int tun[2] = {-1, -1};  // A, B
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> delivered{0}, dropped{0};
  std::vector<std::thread> pumps;

  std::string ns(End e) const { return name + (e == End::kA ? "-a" : "-b"); }

  // One direction: packets read from `src` reach `dst` after the link's model of them.
  void pump(int src, int dst, uint64_t seed) {
    struct InFlight {
      Clock::time_point at;
      std::vector<char> bytes;
    };
    std::deque<InFlight> line;
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    const double rate = spec.link.rate_bits_per_second;
    const auto delay = std::chrono::duration_cast<Clock::duration>(spec.link.one_way_delay);
    const double limit = static_cast<double>(spec.link.queue_limit());
    Clock::time_point free_at = Clock::now();  // when the link has serialised everything queued
    std::vector<char> buf(65536);
    while (!stop) {
      Clock::time_point now = Clock::now();
      while (!line.empty() && line.front().at <= now) {
        if (::write(dst, line.front().bytes.data(), line.front().bytes.size()) > 0)
          ++delivered;
        else
          ++dropped;
        line.pop_front();
      }
      // Sleep until the next delivery is due (at most 20 ms, so that a stop is noticed).
      const int64_t ns = std::clamp<int64_t>(
          line.empty() ? 20000000 : std::chrono::duration_cast<std::chrono::nanoseconds>(line.front().at - now).count(),
          0, 20000000);
      timespec ts{0, static_cast<long>(ns)};
      pollfd p{src, POLLIN, 0};
      if (::ppoll(&p, 1, &ts, nullptr) <= 0 || !(p.revents & POLLIN)) continue;
      while (true) {
        const ssize_t n = ::read(src, buf.data(), buf.size());
        if (n <= 0) break;
        now = Clock::now();
        if (spec.loss > 0 && uniform(rng) < spec.loss) {
          ++dropped;
          continue;
        }
        const double backlog = std::max(0.0, std::chrono::duration<double>(free_at - now).count()) * rate / 8;
        if (backlog + static_cast<double>(n) > limit) {  // drop-tail
          ++dropped;
          continue;
        }
        free_at = std::max(free_at, now) +
                  std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(8.0 * n / rate));
        line.push_back({free_at + delay, std::vector<char>(buf.begin(), buf.begin() + n)});
      }
    }
  }

  void teardown() {
    stop = true;
    for (auto& t : pumps) t.join();
    pumps.clear();
    for (int& fd : tun) {
      if (fd >= 0) ::close(fd);
      fd = -1;
    }
    run_ip({"netns", "del", ns(End::kA)});
    run_ip({"netns", "del", ns(End::kB)});
  }
};

PacketLink::PacketLink(const std::string& name, PacketLinkSpec spec) : impl_(std::make_unique<Impl>()) {
  impl_->spec = spec;
  impl_->name = name;
  if (!(spec.loss >= 0 && spec.loss < 1)) throw Error("loss must lie in [0, 1)", "e.g. 0.01 for 1%");
  if (const std::string why = unavailable(); !why.empty()) throw Error("no packet-level link here: " + why, "");
  try {
    const char* addr[2] = {kAddressA, kAddressB};
    for (End e : {End::kA, End::kB}) {
      const int i = e == End::kA ? 0 : 1;
      const std::string ns = impl_->ns(e);
      run_ip({"netns", "del", ns});  // left over by a process that was killed
      ip_or_throw({"netns", "add", ns});
      std::string why;
      impl_->tun[i] = in_netns(
          ns,
          [] {
            const int fd = ::open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
            if (fd < 0) return -1;
            ifreq ifr{};
            ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
            std::strncpy(ifr.ifr_name, kDevice, IFNAMSIZ - 1);
            if (::ioctl(fd, TUNSETIFF, &ifr) < 0) {
              ::close(fd);
              return -1;
            }
            return fd;
          },
          &why);
      if (impl_->tun[i] < 0) throw Error("cannot create a TUN device in " + ns + ": " + why, "run as root");
      ip_or_throw({"-n", ns, "link", "set", "lo", "up"});
      ip_or_throw({"-n", ns, "addr", "add", std::string(addr[i]) + "/24", "dev", kDevice});
      ip_or_throw({"-n", ns, "link", "set", kDevice, "up"});
    }
  } catch (...) {
    impl_->teardown();
    throw;
  }
  impl_->pumps.emplace_back([this] { impl_->pump(impl_->tun[0], impl_->tun[1], impl_->spec.seed); });
  impl_->pumps.emplace_back([this] { impl_->pump(impl_->tun[1], impl_->tun[0], impl_->spec.seed + 1); });
}

PacketLink::~PacketLink() {
  impl_->teardown();
}

std::string PacketLink::netns(End end) const {
  return impl_->ns(end);
}

int PacketLink::socket_in(End end, int domain, int type) const {
  std::string why;
  const int fd = in_netns(
      impl_->ns(end), [&] { return ::socket(domain, type | SOCK_CLOEXEC, 0); }, &why);
  if (fd < 0) throw Error("cannot open a socket in " + impl_->ns(end) + ": " + why, "");
  return fd;
}

std::pair<int, int> PacketLink::connect_tcp() const {
  const int ls = socket_in(End::kB, AF_INET, SOCK_STREAM);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  ::inet_pton(AF_INET, kAddressB, &addr.sin_addr);
  socklen_t len = sizeof addr;
  auto* sa = reinterpret_cast<sockaddr*>(&addr);
  if (::bind(ls, sa, sizeof addr) != 0 || ::listen(ls, 1) != 0 || ::getsockname(ls, sa, &len) != 0) {
    const std::string why = std::strerror(errno);
    ::close(ls);
    throw Error("cannot listen at end B of the packet link: " + why, "");
  }
  const int cs = socket_in(End::kA, AF_INET, SOCK_STREAM);
  const int ss = ::connect(cs, sa, sizeof addr) == 0 ? ::accept(ls, nullptr, nullptr) : -1;
  const std::string why = std::strerror(errno);
  ::close(ls);
  if (ss < 0) {
    ::close(cs);
    throw Error("cannot connect across the packet link: " + why, "is the link's delay line running?");
  }
  const int one = 1;
  for (int fd : {cs, ss}) ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return {cs, ss};
}

uint64_t PacketLink::delivered() const {
  return impl_->delivered;
}
uint64_t PacketLink::dropped() const {
  return impl_->dropped;
}

std::string PacketLink::unavailable() {
  if (::geteuid() != 0) return "it needs root (network namespaces and TUN devices)";
  if (::access("/dev/net/tun", R_OK | W_OK) != 0) return "/dev/net/tun is missing";
  if (run_ip({"-V"}) != 0) return "iproute2's `ip` is not installed";
  const std::string probe = "amaq-probe-" + std::to_string(::getpid());
  if (run_ip({"netns", "add", probe}) != 0) return "`ip netns add` is not permitted here";
  run_ip({"netns", "del", probe});
  return "";
}

}  // namespace amaq::wire
