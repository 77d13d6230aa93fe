#pragma once
/// \file
/// `mapped_file`: a read-only memory map of a whole file, shared by every tensor view made from
/// it. Held through `std::shared_ptr`, so the mapping lives as long as the last view. Pure POSIX.
///
/// Example:
/// \code
///   auto file = distorch::mapped_file::open("model.safetensors");
///   std::span<const std::byte> bytes = file->bytes();
/// \endcode

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <algorithm>
#include <cstring>
#include <memory>
#include <span>
#include <string>

#include "distorch/core/error.hpp"

namespace distorch::inline v0 {

/// A read-only memory map of one whole file. Made only by `open`, held by `shared_ptr`: every view
/// made from it keeps the mapping alive.
/// \code
///   auto file = distorch::mapped_file::open("model.gguf");
///   auto header = file->bytes().first(std::min<std::size_t>(file->size(), 24));
/// \endcode
class mapped_file {
 public:
  /// Maps `path` read-only. Throws `format_error` naming the path when it cannot be opened.
  static std::shared_ptr<const mapped_file> open(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_errno("opening file", path, "check that the file exists and is readable");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      throw_errno("reading file size", path, "check that the path names a regular file");
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw format_error({"opening file", path, std::nullopt, "not a regular file", "pass the path of a weight file"});
    }
    const auto size = static_cast<std::size_t>(st.st_size);
    void* data = nullptr;
    if (size > 0) {
      // Private and writable: a tensor view written by mistake gets its own copy-on-write page and
      // never reaches the file or another process. MAP_NORESERVE: a writable private mapping would
      // otherwise be charged in full against overcommit, and files larger than RAM would not map.
      data = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
      if (data == MAP_FAILED) {
        ::close(fd);
        throw_errno("mapping file", path, "check free address space and file permissions");
      }
    }
    ::close(fd);  // the mapping keeps the file alive, and replacing the path does not disturb it
    return std::shared_ptr<const mapped_file>(new mapped_file(path, static_cast<const std::byte*>(data), size));
  }

  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  ~mapped_file() {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
  }

  /// The whole file's bytes.
  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  /// The first byte (nullptr for an empty file).
  const std::byte* data() const noexcept { return data_; }
  /// The file size in bytes.
  std::size_t size() const noexcept { return size_; }
  /// The path it was opened from, for messages.
  const std::string& path() const noexcept { return path_; }

  /// Hints the kernel that a range will be read soon (sequential read-ahead).
  void will_need(std::size_t offset, std::size_t length) const noexcept {
    if (data_ == nullptr || offset >= size_) return;
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const std::size_t begin = offset / page * page;
    ::madvise(const_cast<std::byte*>(data_) + begin, std::min(size_ - begin, length + (offset - begin)), MADV_WILLNEED);
  }

 private:
  mapped_file(std::string path, const std::byte* data, std::size_t size) : path_(std::move(path)), data_(data), size_(size) {}

  [[noreturn]] static void throw_errno(const char* doing, const std::string& path, const char* fix) {
    throw format_error({doing, path, std::nullopt, std::strerror(errno), fix});
  }

  std::string path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace distorch::inline v0
