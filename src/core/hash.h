// Hashes, MACs and randomness (OpenSSL).
#pragma once
#include <string>
#include <string_view>

namespace amaq {

std::string sha256_hex(std::string_view data);
/// Raw 32-byte HMAC-SHA256.
std::string hmac_sha256(std::string_view key, std::string_view data);
std::string to_hex(std::string_view bytes);
/// `n` bytes from OpenSSL's CSPRNG, hex-encoded.
std::string random_hex(size_t n);
/// Constant-time equality.
bool equal_secret(std::string_view a, std::string_view b);

}  // namespace amaq
