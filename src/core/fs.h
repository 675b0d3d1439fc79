// Small file helpers: whole-file reads and atomic writes (temp file, fsync, rename), directories.
// Plain POSIX underneath, not std::filesystem: PyTorch 2.x's libtorch.so exports copies of
// std::filesystem functions that the dynamic linker may bind our calls to, and they crash.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace amaq {

std::string read_file(const std::string& path);
/// Writes `bytes` to `path` atomically: a reader sees the old file or the new one, never half.
/// Files are created 0600 and directories 0700 (before the umask): private to this user.
void write_file_atomic(const std::string& path, std::string_view bytes);
bool file_exists(const std::string& path);
std::string join_path(const std::string& dir, const std::string& name);
/// mkdir -p; errors name the path.
void make_dirs(const std::string& path);
/// fsync a directory so renames inside it are durable (best effort).
void sync_dir(const std::string& dir);
/// rm -rf: removes `path` and everything under it (nothing if it does not exist); errors name the path.
void remove_tree(const std::string& path);
/// The names in a directory whose entries are directories (empty if it cannot be read).
std::vector<std::string> list_subdirs(const std::string& dir);
/// rename(2); errors name both paths.
void rename_path(const std::string& from, const std::string& to);
/// $TMPDIR, or /tmp.
std::string temp_dir();

}  // namespace amaq
