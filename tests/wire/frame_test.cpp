// Frames and the in-process channel: round trips, limits checked before allocation, checksums,
// and byte accounting.
#include "wire/frame.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <random>
#include <thread>

#include "wire/channel.h"

namespace amaq::wire {
namespace {

constexpr uint64_t kLimit = 1 << 20;

TEST(Crc32c, KnownVector) {
  // RFC 3720 (iSCSI) test vector: CRC32C of "123456789" is 0xE3069283.
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
  EXPECT_EQ(crc32c_portable("123456789", 9), 0xE3069283u);
  // The hardware path equals the portable one at every length and alignment, below, at and past the
  // 3 x 4 KiB blocks it computes as three chains.
  std::mt19937_64 rng(3);
  std::string data(100000 + 7, '\0');
  for (auto& c : data) c = static_cast<char>(rng());
  for (size_t off = 0; off < 8; ++off) {
    for (size_t len : {0, 1, 7, 8, 9, 63, 64, 1000, 4096, 12287, 12288, 12289, 24576 + 13, 100000}) {
      EXPECT_EQ(crc32c(data.data() + off, len), crc32c_portable(data.data() + off, len)) << off << "+" << len;
    }
  }
  // Extending a CRC over the next bytes gives the CRC of the whole, on both paths (a decoder checks a
  // payload piece by piece as it arrives).
  for (size_t cut : {0, 1, 8, 5000, 12288, 40000, 100000}) {
    const uint32_t whole = crc32c_portable(data.data(), 100000);
    EXPECT_EQ(crc32c_extend(crc32c(data.data(), cut), data.data() + cut, 100000 - cut), whole) << cut;
    EXPECT_EQ(crc32c_portable_extend(crc32c_portable(data.data(), cut), data.data() + cut, 100000 - cut), whole) << cut;
  }
}

TEST(Frame, EveryMessageTypeRoundTripsByteByByte) {
  std::string stream;
  std::vector<Frame> sent;
  for (uint8_t t = 1; t <= kMaxMessageType; ++t) {
    Frame f{static_cast<MessageType>(t), static_cast<uint8_t>(t * 3), std::string(t * 37, static_cast<char>('a' + t))};
    sent.push_back(f);
    stream += encode_frame(f);
  }
  FrameDecoder d(kLimit);
  for (char c : stream) ASSERT_TRUE(d.feed(std::string_view(&c, 1)).ok());  // worst-case fragmentation
  for (const auto& f : sent) {
    Frame got;
    ASSERT_TRUE(d.next(&got));
    EXPECT_EQ(got.type, f.type);
    EXPECT_EQ(got.flags, f.flags);
    EXPECT_EQ(got.payload, f.payload);
  }
  Frame none;
  EXPECT_FALSE(d.next(&none));
}

// Filling buffer() in place, as the TCP channel does from its socket: the decoder never offers more
// than the rest of the frame in progress, so a reader that fills whatever it is offered takes each
// frame's bytes exactly and never the next one's; a payload longer than kGrowStep comes in pieces,
// and an empty payload completes with its header.
TEST(Frame, FillingInPlaceTakesEachFrameExactly) {
  const std::vector<Frame> sent{{MessageType::kForward, 1, std::string(FrameDecoder::kGrowStep + 1000, 'x')},
                                {MessageType::kBye, 0, ""},
                                {MessageType::kBackward, 2, "gradient"}};
  std::string stream;
  for (const auto& f : sent) stream += encode_frame(f);
  FrameDecoder d(uint64_t{64} << 20);
  size_t at = 0;
  for (const auto& f : sent) {
    const size_t end = at + sizeof(FrameHeader) + f.payload.size();
    Frame got;
    while (!d.next(&got)) {
      const auto [to, room] = d.buffer();
      ASSERT_GT(room, 0u);
      ASSERT_LE(room, d.wanted());
      ASSERT_LE(at + room, end) << "offered bytes past the frame";
      std::memcpy(to, stream.data() + at, room);
      at += room;
      ASSERT_TRUE(d.commit(room).ok());
    }
    EXPECT_EQ(at, end);
    EXPECT_EQ(got.type, f.type);
    EXPECT_EQ(got.flags, f.flags);
    EXPECT_TRUE(got.payload == f.payload);
  }
}

FrameHeader header_of(const std::string& bytes) {
  FrameHeader h;
  std::memcpy(&h, bytes.data(), sizeof h);
  return h;
}

std::string with_header(std::string bytes, const FrameHeader& h) {
  std::memcpy(bytes.data(), &h, sizeof h);
  return bytes;
}

TEST(Frame, HostileHeadersAreRefusedBeforeAnyAllocation) {
  std::string good = encode_frame({MessageType::kForward, 0, "payload"});
  struct Case {
    std::function<void(FrameHeader&)> mutate;
    ErrorCode code;
  } cases[] = {
      {[](FrameHeader& h) { h.magic = 0x12345678; }, ErrorCode::kBadMagic},
      {[](FrameHeader& h) { h.version = 99; }, ErrorCode::kBadVersion},
      {[](FrameHeader& h) { h.type = 0; }, ErrorCode::kBadType},
      {[](FrameHeader& h) { h.type = 200; }, ErrorCode::kBadType},
      {[](FrameHeader& h) { h.length = uint64_t{1} << 60; }, ErrorCode::kTooLarge},
      {[](FrameHeader& h) { h.checksum ^= 1; }, ErrorCode::kBadChecksum},
  };
  for (const auto& c : cases) {
    FrameHeader h = header_of(good);
    c.mutate(h);
    FrameDecoder d(kLimit);
    Status s = d.feed(with_header(good, h));
    EXPECT_EQ(s.code, c.code) << s.message;
    EXPECT_FALSE(s.message.empty());
    EXPECT_EQ(d.feed("more").code, c.code) << "a failed decoder stays failed";
  }
  // A header announcing 2^60 bytes is refused as soon as the 24 header bytes are in.
  FrameHeader h = header_of(good);
  h.length = uint64_t{1} << 60;
  FrameDecoder d(kLimit);
  EXPECT_EQ(d.feed(std::string_view(with_header(good, h)).substr(0, sizeof h)).code, ErrorCode::kTooLarge);
}

TEST(Frame, TruncatedFrameWaitsForTheRest) {
  std::string good = encode_frame({MessageType::kBackward, 0, std::string(100, 'x')});
  FrameDecoder d(kLimit);
  ASSERT_TRUE(d.feed(std::string_view(good).substr(0, 50)).ok());
  Frame f;
  EXPECT_FALSE(d.next(&f));
  EXPECT_EQ(d.wanted(), good.size() - 50);
  ASSERT_TRUE(d.feed(std::string_view(good).substr(50)).ok());
  EXPECT_TRUE(d.next(&f));
}

TEST(Frame, RandomBytesNeverCrashTheDecoder) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string junk(1 + rng() % 200, '\0');
    for (auto& c : junk) c = static_cast<char>(rng());
    FrameDecoder d(kLimit);
    Frame f;
    if (trial % 2 == 0) {
      // Pure noise: refused as soon as a header's worth has arrived (a random magic), else waiting.
      Status s = d.feed(junk);
      EXPECT_EQ(s.ok(), junk.size() < sizeof(FrameHeader)) << s.message;
    } else {
      // A well-formed header over a payload with one byte changed in flight: the checksum catches it.
      std::string frame = encode_frame({MessageType::kForward, 0, junk});
      frame[sizeof(FrameHeader) + rng() % junk.size()] ^= static_cast<char>(1 + rng() % 255);
      EXPECT_EQ(d.feed(frame).code, ErrorCode::kBadChecksum);
    }
    EXPECT_FALSE(d.next(&f));
  }
}

TEST(InProcessChannel, CarriesFramesBothWaysAndCountsBytes) {
  auto [client, server] = make_in_process_pair(kLimit);
  std::thread echo([&, srv = server.get()] {
    Frame f;
    while (srv->receive(&f, std::chrono::seconds(5)).ok()) {
      if (f.type == MessageType::kBye) break;
      f.payload += "!";
      srv->send(f);
    }
  });
  uint64_t expect_sent = 0;
  for (uint8_t t = 1; t <= kMaxMessageType; ++t) {
    // BYE ends the echo; HEARTBEAT is consumed by receive() (see the Heartbeat test).
    if (static_cast<MessageType>(t) == MessageType::kBye || static_cast<MessageType>(t) == MessageType::kHeartbeat)
      continue;
    Frame f{static_cast<MessageType>(t), 0, std::string(t, 'p')};
    ASSERT_TRUE(client->send(f).ok());
    expect_sent += sizeof(FrameHeader) + t;
    Frame back;
    ASSERT_TRUE(client->receive(&back, std::chrono::seconds(5)).ok());
    EXPECT_EQ(back.type, f.type);
    EXPECT_EQ(back.payload, f.payload + "!");
  }
  ASSERT_TRUE(client->send({MessageType::kBye, 0, ""}).ok());
  echo.join();
  EXPECT_EQ(client->accounting().bytes_sent(), expect_sent + sizeof(FrameHeader));
  EXPECT_EQ(client->accounting().bytes_received(), server->accounting().bytes_sent());
  EXPECT_EQ(client->accounting().sent[static_cast<int>(MessageType::kForward)].frames, 1u);
  Frame f;
  EXPECT_EQ(client->receive(&f, std::chrono::milliseconds(10)).code, ErrorCode::kTimeout);
  server->close();
  EXPECT_EQ(client->receive(&f, std::chrono::milliseconds(10)).code, ErrorCode::kClosed);
}

TEST(Heartbeat, KeepsAWaitingPeerFromTimingOutWhileTheOtherComputes) {
  auto [client, server] = make_in_process_pair(kLimit);
  std::thread busy_server([srv = server.get()] {
    {
      HeartbeatScope alive(*srv, std::chrono::milliseconds(50));
      std::this_thread::sleep_for(std::chrono::milliseconds(600));  // "computing" for 3x the idle limit
    }
    srv->send({MessageType::kBackward, 0, "result"});
  });
  Frame f;
  Status s = client->receive(&f, std::chrono::milliseconds(200));
  busy_server.join();
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(f.type, MessageType::kBackward);  // heartbeats are consumed, never returned
  EXPECT_GE(client->accounting().received[static_cast<int>(MessageType::kHeartbeat)].frames, 5u);
  // Without heartbeats the same silence is a timeout.
  std::thread silent([srv = server.get()] {
    std::this_thread::sleep_for(std::chrono::milliseconds(600));
    srv->send({MessageType::kBackward, 0, "late"});
  });
  EXPECT_EQ(client->receive(&f, std::chrono::milliseconds(200)).code, ErrorCode::kTimeout);
  silent.join();
}

}  // namespace
}  // namespace amaq::wire
