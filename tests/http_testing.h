// Plain HTTP/1.1 for the tests of the status page, over a socket (not Beast: the server's own parser
// is what is under test), and reading a sample out of Prometheus' text format.
#pragma once
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <cstdint>
#include <sstream>
#include <string>

namespace amaq::testing {

// The whole response to `request` sent to 127.0.0.1:`port`; "" when the server closed without one.
inline std::string http_raw(uint16_t port, const std::string& request) {
  namespace asio = boost::asio;
  asio::io_context io;
  asio::ip::tcp::socket s(io);
  boost::system::error_code ec;
  s.connect(asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), port), ec);
  if (!ec) asio::write(s, asio::buffer(request), ec);  // a server that closed at once may reset it
  std::string out;
  asio::read(s, asio::dynamic_buffer(out), ec);  // until the server closes
  return out;
}
inline std::string http_get(uint16_t port, const std::string& path, const std::string& extra = "") {
  return http_raw(port, "GET " + path + " HTTP/1.1\r\nHost: x\r\n" + extra + "\r\n");
}
inline int status_code(const std::string& response) {
  return response.size() > 12 && response.compare(0, 5, "HTTP/") == 0 ? std::stoi(response.substr(9, 3)) : 0;
}
// The value of the first sample of `metric` whose labels contain `labels`, or -1.
inline double sample(const std::string& text, const std::string& metric, const std::string& labels = "") {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(metric, 0) != 0 || line.find(labels) == std::string::npos) continue;
    const char next = line[metric.size()];
    if (next != ' ' && next != '{') continue;
    return std::stod(line.substr(line.rfind(' ') + 1));
  }
  return -1;
}

}  // namespace amaq::testing
