#pragma once
/// \file
/// The safetensors writer: pure C++20 over byte spans, no LibTorch (io/torch_tensor.hpp adds
/// `save_safetensors` for tensors). Layout is canonical: tensors sorted by element size, largest
/// first, then by name, so that with the header padded to a multiple of 8 bytes every tensor
/// starts at an offset aligned to its element size. The file is written to a temporary file in
/// the target's directory and renamed over the target, so a crash never leaves a truncated file
/// and a reader that has the old file mapped keeps reading the old bytes.
///
/// Example:
/// \code
///   std::vector<float> w(6, 1.0f);
///   std::vector<distorch::safetensors_entry> entries{
///       {"layer.weight", distorch::dtype::f32, {2, 3}, std::as_bytes(std::span(w))}};
///   distorch::write_safetensors("out.safetensors", entries, {{"format", "pt"}});
/// \endcode

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <numeric>
#include <span>
#include <string>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "distorch/core/error.hpp"
#include "distorch/io/safetensors.hpp"
#include "distorch/model/dtype.hpp"

namespace distorch::inline v0 {

/// One tensor to write: its bytes must be exactly numel × dtype size, little-endian, row-major.
struct safetensors_entry {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> data;
};

namespace detail {

[[noreturn]] inline void safetensors_write_fail(const std::string& path, std::string subject, std::string problem,
                                                std::string fix) {
  throw format_error({"writing safetensors file " + path, std::move(subject), std::nullopt, std::move(problem),
                      std::move(fix)});
}

/// Entry indices in canonical layout order, after validating every entry.
inline std::vector<std::size_t> safetensors_layout(std::span<const safetensors_entry> entries, const std::string& path) {
  std::unordered_set<std::string_view> names;
  for (const auto& e : entries) {
    if (e.name == "__metadata__")
      safetensors_write_fail(path, e.name, "the name is reserved for metadata", "rename the tensor");
    if (!names.insert(e.name).second)
      safetensors_write_fail(path, e.name, "tensor name given twice", "give each tensor a unique name");
    if (safetensors_dtype_name(e.type).empty())
      safetensors_write_fail(path, e.name, "dtype " + std::string(dtype_name(e.type)) + " has no safetensors name",
                             "convert the tensor to a dtype the format defines");
    std::uint64_t numel = 1;
    for (const auto d : e.shape) {
      if (d < 0) safetensors_write_fail(path, e.name, "negative dimension in shape", "pass the real shape");
      if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(d), &numel))
        safetensors_write_fail(path, e.name, "shape's element count overflows", "pass the real shape");
    }
    std::uint64_t bytes = 0;
    if (__builtin_mul_overflow(numel, dtype_size(e.type), &bytes) || bytes != e.data.size())
      safetensors_write_fail(path, e.name,
                             "data holds " + std::to_string(e.data.size()) + " bytes, shape x dtype needs " +
                                 std::to_string(numel * dtype_size(e.type)),
                             "pass the tensor's contiguous bytes");
  }
  std::vector<std::size_t> order(entries.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const auto sa = dtype_size(entries[a].type), sb = dtype_size(entries[b].type);
    return sa != sb ? sa > sb : entries[a].name < entries[b].name;
  });
  return order;
}

inline void safetensors_write_all(int fd, const std::byte* p, std::size_t n, const std::string& tmp_path) {
  while (n > 0) {
    const ::ssize_t w = ::write(fd, p, std::min<std::size_t>(n, std::size_t{1} << 30));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0)
      safetensors_write_fail(tmp_path, "", std::string("write failed: ") + std::strerror(errno),
                             "check free disk space and permissions");
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

}  // namespace detail

/// The header bytes (u64 N plus the JSON padded with spaces so 8 + N is a multiple of 8) for these
/// entries, and the entry order of the data buffer. Throws `format_error` for an invalid entry.
/// \code
///   auto [header, order] = distorch::safetensors_header_bytes(entries, {});
/// \endcode
inline std::pair<std::vector<std::byte>, std::vector<std::size_t>> safetensors_header_bytes(
    std::span<const safetensors_entry> entries, const std::map<std::string, std::string>& metadata,
    const std::string& path = "<memory>") {
  auto order = detail::safetensors_layout(entries, path);
  nlohmann::ordered_json doc = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    auto& m = doc["__metadata__"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
  }
  std::uint64_t offset = 0;
  for (const auto i : order) {
    const auto& e = entries[i];
    doc[e.name] = {{"dtype", std::string(safetensors_dtype_name(e.type))},
                   {"shape", e.shape},
                   {"data_offsets", {offset, offset + e.data.size()}}};
    offset += e.data.size();
  }
  std::string json = doc.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  std::vector<std::byte> header(8 + json.size());
  std::uint64_t n = json.size();
  for (int b = 0; b < 8; ++b) header[static_cast<std::size_t>(b)] = static_cast<std::byte>((n >> (8 * b)) & 0xFF);
  std::memcpy(header.data() + 8, json.data(), json.size());
  return {std::move(header), std::move(order)};
}

/// The whole file in memory (for tests and small files).
/// \code
///   std::vector<std::byte> file = distorch::serialize_safetensors(entries);
/// \endcode
inline std::vector<std::byte> serialize_safetensors(std::span<const safetensors_entry> entries,
                                                    const std::map<std::string, std::string>& metadata = {}) {
  auto [out, order] = safetensors_header_bytes(entries, metadata);
  for (const auto i : order) out.insert(out.end(), entries[i].data.begin(), entries[i].data.end());
  return out;
}

/// Writes a safetensors file atomically: a temporary file in the same directory, flushed to disk,
/// then renamed over `path`. On any failure the temporary file is removed and `path` is untouched.
/// Throws `format_error` for invalid entries and for I/O failures.
/// \code
///   distorch::write_safetensors("model.safetensors", entries, {{"format", "pt"}});
/// \endcode
inline void write_safetensors(const std::string& path, std::span<const safetensors_entry> entries,
                              const std::map<std::string, std::string>& metadata = {}) {
  const auto [header, order] = safetensors_header_bytes(entries, metadata, path);
  const auto slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  std::string tmp = (dir == "/" ? std::string("/") : dir + "/") + "." + base + ".tmp-XXXXXX";
  const int fd = ::mkstemp(tmp.data());
  if (fd < 0)
    detail::safetensors_write_fail(path, "", std::string("cannot create a temporary file: ") + std::strerror(errno),
                                   "check that the directory exists and is writable");
  bool closed = false;
  try {
    detail::safetensors_write_all(fd, header.data(), header.size(), tmp);
    for (const auto i : order) detail::safetensors_write_all(fd, entries[i].data.data(), entries[i].data.size(), tmp);
    if (::fchmod(fd, 0644) != 0 || ::fsync(fd) != 0)
      detail::safetensors_write_fail(path, "", std::string("cannot flush the file: ") + std::strerror(errno),
                                     "check free disk space");
    closed = true;
    if (::close(fd) != 0)
      detail::safetensors_write_fail(path, "", std::string("cannot close the file: ") + std::strerror(errno),
                                     "check free disk space");
  } catch (...) {
    if (!closed) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    detail::safetensors_write_fail(path, "", std::string("cannot rename the temporary file: ") + std::strerror(err),
                                   "check that the target is not a directory and the folder is writable");
  }
  // Persist the rename itself.
  if (const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace distorch::inline v0
