#include "wire/link_emulator.h"

#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <boost/asio.hpp>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <regex>
#include <thread>
#include <vector>

#include "core/error.h"

namespace amaq::wire {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;
using Clock = std::chrono::steady_clock;

uint64_t LinkSpec::queue_limit() const {
  if (queue_bytes > 0) return queue_bytes;
  const double bdp = rate_bits_per_second / 8 * std::chrono::duration<double>(one_way_delay).count();
  return std::max<uint64_t>(uint64_t{1} << 20, static_cast<uint64_t>(2 * bdp));
}

LinkSpec LinkSpec::parse(const std::string& text) {
  static const std::regex re(R"(^\s*([0-9.]+)\s*(k|m|g)bit\s*/\s*([0-9.]+)\s*(us|ms|s)\s*$)", std::regex::icase);
  std::smatch m;
  if (!std::regex_match(text, m, re)) {
    throw Error("link '" + text + "' is not RATE/RTT",
                "give the rate in kbit, mbit or gbit and the round-trip time in us, ms or s, e.g. 100mbit/20ms");
  }
  const char unit = static_cast<char>(std::tolower(m[2].str()[0]));
  const double rate = std::stod(m[1]) * (unit == 'k' ? 1e3 : unit == 'm' ? 1e6 : 1e9);
  const std::string t = m[4];
  const double rtt_s = std::stod(m[3]) * (t == "us" ? 1e-6 : t == "ms" ? 1e-3 : 1.0);
  if (!(rate >= 1e3 && rate <= 1e12) || !(rtt_s >= 0 && rtt_s <= 10)) {
    throw Error("link '" + text + "' is out of range", "rates from 1 kbit to 1000 gbit, round trips up to 10 s");
  }
  LinkSpec s;
  s.rate_bits_per_second = rate;
  s.one_way_delay = std::chrono::microseconds(static_cast<int64_t>(rtt_s / 2 * 1e6));
  return s;
}

std::string LinkSpec::to_string() const {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%gmbit/%gms", rate_bits_per_second / 1e6,
                2 * std::chrono::duration<double, std::milli>(one_way_delay).count());
  return buf;
}

namespace {

// Wakes a thread blocked in accept/read on `fd` (close alone would race with it).
void wake(int fd) {
  if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
}

// One direction of one connection: a reader that stamps each chunk with the time the link delivers
// it, and a writer that hands it on at that time.
class Pipe {
 public:
  Pipe(tcp::socket& from, tcp::socket& to, const LinkSpec& spec, const std::atomic<double>& rate,
       std::atomic<uint64_t>& delivered)
      : from_(from), to_(to), spec_(spec), rate_(rate), delivered_(delivered) {}

  void read_loop() {
    std::vector<char> buf(16 << 10);
    Clock::time_point link_free{}, looked = Clock::now();  // looked: when this thread last read
    const uint64_t limit = spec_.queue_limit();
    while (true) {
      error_code ec;
      const auto asked = Clock::now();
      const size_t n = from_.read_some(asio::buffer(buf), ec);
      if (ec || n == 0) break;
      // Serialisation: the link is busy with earlier bytes until link_free; each piece takes its
      // bytes * 8 / rate more and is delivered when it is through. Pieces are a packet or 1 ms of
      // the link, whichever is larger, so a receiver sees bytes arrive at the link's pace. Bytes
      // that were already waiting when this thread came to read (it was not running, or waited on
      // a full queue) reached the link no later than its previous read: the link would not have
      // idled for this thread's absence.
      const auto now = Clock::now();
      const bool were_waiting = now - asked < std::chrono::microseconds(50);
      if (link_free < now) link_free = were_waiting ? std::max(link_free, looked) : now;
      const double rate = rate_.load();
      const size_t piece = std::max<size_t>(1448, static_cast<size_t>(rate / 8 * 1e-3));
      for (size_t at = 0; at < n; at += piece) {
        const size_t len = std::min(piece, n - at);
        link_free += std::chrono::duration_cast<Clock::duration>(
            std::chrono::duration<double>(static_cast<double>(len) * 8 / rate));
        Chunk c{std::vector<char>(buf.begin() + static_cast<std::ptrdiff_t>(at),
                                  buf.begin() + static_cast<std::ptrdiff_t>(at + len)),
                link_free + spec_.one_way_delay};
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return queued_ + len <= limit || queue_.empty(); });  // a full queue stops reading
        queued_ += len;
        queue_.push_back(std::move(c));
        cv_.notify_all();
      }
      looked = Clock::now();
    }
    std::lock_guard<std::mutex> lock(mu_);
    ended_ = true;
    cv_.notify_all();
  }

  void write_loop() {
    while (true) {
      Chunk c;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !queue_.empty() || ended_; });
        if (queue_.empty()) break;
        c = std::move(queue_.front());
        queue_.pop_front();
      }
      std::this_thread::sleep_until(c.deliver_at);
      {  // pieces that are due by now too go in the same write (a thread that woke late catches up)
        std::lock_guard<std::mutex> lock(mu_);
        const auto now = Clock::now();
        while (!queue_.empty() && queue_.front().deliver_at <= now) {
          c.bytes.insert(c.bytes.end(), queue_.front().bytes.begin(), queue_.front().bytes.end());
          queue_.pop_front();
        }
      }
      delivered_ += c.bytes.size();  // counted as it leaves the link, before the reader can see it
      error_code ec;
      asio::write(to_, asio::buffer(c.bytes), ec);
      {
        std::lock_guard<std::mutex> lock(mu_);
        queued_ -= c.bytes.size();
        cv_.notify_all();
      }
      if (ec) break;
    }
    error_code ignored;
    to_.shutdown(tcp::socket::shutdown_send, ignored);  // the other end sees EOF once everything arrived
  }

 private:
  struct Chunk {
    std::vector<char> bytes;
    Clock::time_point deliver_at;
  };
  tcp::socket& from_;
  tcp::socket& to_;
  const LinkSpec& spec_;
  const std::atomic<double>& rate_;  // bits per second, now (LinkEmulator::set_rate)
  std::atomic<uint64_t>& delivered_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Chunk> queue_;
  uint64_t queued_ = 0;
  bool ended_ = false;
};

// A relayed connection: the accepted socket, the one to the target, and a pipe each way.
struct Relay {
  Relay(asio::io_context& io, const LinkSpec& spec, const std::atomic<double>& rate, std::atomic<uint64_t>& fwd,
        std::atomic<uint64_t>& bwd)
      : client(io), target(io), forward(client, target, spec, rate, fwd), backward(target, client, spec, rate, bwd) {}
  void start() {
    for (Pipe* p : {&forward, &backward}) {
      threads.emplace_back([p] { p->read_loop(); });
      threads.emplace_back([p] { p->write_loop(); });
    }
  }
  void stop() {
    wake(client.native_handle());
    wake(target.native_handle());
    for (auto& t : threads) t.join();
  }
  tcp::socket client, target;
  Pipe forward, backward;
  std::vector<std::thread> threads;
};

}  // namespace

struct LinkEmulator::Impl {
  LinkSpec spec;
  std::atomic<double> rate{0};
  std::string host;
  uint16_t target_port;
  asio::io_context io;
  tcp::acceptor acceptor{io};
  std::thread accept_thread;
  std::mutex mu;
  std::vector<std::unique_ptr<Relay>> relays;
  std::atomic<bool> stopping{false};
  std::atomic<uint64_t> forward{0}, backward{0};

  void accept_loop() {
    while (!stopping) {
      auto r = std::make_unique<Relay>(io, spec, rate, forward, backward);
      error_code ec;
      acceptor.accept(r->client, ec);
      if (ec || stopping) return;
      r->client.set_option(tcp::no_delay(true), ec);
      tcp::resolver resolver(io);
      auto endpoints = resolver.resolve(host, std::to_string(target_port), ec);
      if (!ec) asio::connect(r->target, endpoints, ec);
      if (ec) continue;  // the target is not there: this connection closes, the next may succeed
      r->target.set_option(tcp::no_delay(true), ec);
      r->start();
      std::lock_guard<std::mutex> lock(mu);
      relays.push_back(std::move(r));
    }
  }
};

LinkEmulator::LinkEmulator(uint16_t listen_port, const std::string& target_host, uint16_t target_port, LinkSpec spec)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.spec = spec;
  s.rate = spec.rate_bits_per_second;
  s.host = target_host;
  s.target_port = target_port;
  error_code ec;
  const tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), listen_port);
  s.acceptor.open(ep.protocol(), ec);
  if (!ec) s.acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) s.acceptor.bind(ep, ec);
  if (!ec) s.acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    throw Error("link emulator cannot listen on 127.0.0.1:" + std::to_string(listen_port) + ": " + ec.message(),
                "pick a free port");
  }
  s.accept_thread = std::thread([&s] { s.accept_loop(); });
}

LinkEmulator::~LinkEmulator() {
  Impl& s = *impl_;
  s.stopping = true;
  wake(s.acceptor.native_handle());
  s.accept_thread.join();
  for (auto& r : s.relays) r->stop();
}

uint16_t LinkEmulator::port() const {
  return impl_->acceptor.local_endpoint().port();
}

void LinkEmulator::set_rate(double bits_per_second) {
  if (!(bits_per_second > 0)) throw Error("a link's rate must be positive", "give bits per second, e.g. 100e6");
  impl_->rate = bits_per_second;
}

uint64_t LinkEmulator::bytes_forward() const {
  return impl_->forward;
}

uint64_t LinkEmulator::bytes_backward() const {
  return impl_->backward;
}

}  // namespace amaq::wire
