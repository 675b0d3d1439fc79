// Small file helpers: whole-file reads and atomic writes (temp file, fsync, rename).
#pragma once
#include <string>
#include <string_view>

namespace amaq {

std::string read_file(const std::string& path);
/// Writes `bytes` to `path` atomically: a reader sees the old file or the new one, never half.
void write_file_atomic(const std::string& path, std::string_view bytes);
bool file_exists(const std::string& path);
std::string join_path(const std::string& dir, const std::string& name);
/// mkdir -p; errors name the path.
void make_dirs(const std::string& path);
/// fsync a directory so renames inside it are durable (best effort).
void sync_dir(const std::string& dir);

}  // namespace amaq
