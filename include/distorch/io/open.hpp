#pragma once
/// \file
/// `open_weights(path)`: opens any supported weight file as a `weight_source`, choosing the reader
/// from the file's first bytes (magic numbers), and from its extension only where the content is
/// ambiguous. One function dispatches on the sniffed format, so adding a reader is one `case`.
///
/// Example:
/// \code
///   auto src = distorch::open_weights("model.safetensors");          // or model.safetensors.index.json
///   for (const auto& r : src->records()) std::cout << r.name << '\n';
/// \endcode

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include "distorch/core/error.hpp"
#include "distorch/io/gguf_source.hpp"
#include "distorch/io/safetensors.hpp"
#include "distorch/io/safetensors_source.hpp"
#include "distorch/io/torch_zip_source.hpp"
#include "distorch/io/weight_source.hpp"

namespace distorch::inline v0 {

/// What a file looks like from its first bytes.
enum class weight_format { safetensors, safetensors_index, gguf, torch_zip, torch_legacy, unknown };

namespace detail {

inline bool open_ends_with(std::string_view s, std::string_view suffix) noexcept {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

inline bool open_json_space(unsigned char c) noexcept { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

}  // namespace detail

/// Sniffs a file's format from its first bytes and name. Throws `format_error` when the file
/// cannot be opened.
/// \code
///   if (distorch::sniff_weight_format("m.gguf") == distorch::weight_format::gguf) { /* ... */ }
/// \endcode
inline weight_format sniff_weight_format(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw format_error({"opening weight file", path, std::nullopt, std::strerror(errno),
                        "check that the file exists and is readable"});
  std::array<unsigned char, 64> head{};
  std::size_t got = 0;
  while (got < head.size()) {
    const ::ssize_t r = ::pread(fd, head.data() + got, head.size() - got, static_cast<off_t>(got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += static_cast<std::size_t>(r);
  }
  const off_t size = ::lseek(fd, 0, SEEK_END);
  ::close(fd);
  auto starts = [&](std::string_view magic) {
    return got >= magic.size() && std::memcmp(head.data(), magic.data(), magic.size()) == 0;
  };
  if (starts("GGUF")) return weight_format::gguf;
  if (starts("PK\x03\x04")) return weight_format::torch_zip;
  if (detail::open_ends_with(path, ".json")) return weight_format::safetensors_index;
  // safetensors: a plausible header length, then JSON starting (after padding) with '{'.
  if (got >= 9 && size >= 8) {
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | head[static_cast<std::size_t>(i)];
    std::size_t k = 8;
    while (k < got && detail::open_json_space(head[k])) ++k;
    if (n <= safetensors_max_header_bytes && n <= static_cast<std::uint64_t>(size) - 8 && k < got && head[k] == '{')
      return weight_format::safetensors;
  }
  // Legacy torch.save: a pickle (protocol 2) of the magic number 0x1950a86a20f9469cfc6c.
  if (starts("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19")) return weight_format::torch_legacy;
  std::size_t k = 0;
  while (k < got && detail::open_json_space(head[k])) ++k;
  if (k < got && head[k] == '{') return weight_format::safetensors_index;
  if (detail::open_ends_with(path, ".safetensors")) return weight_format::safetensors;  // let the parser say why
  return weight_format::unknown;
}

/// Opens a weight file with the reader its content calls for. Throws `format_error` for an
/// unreadable or malformed file, and for a format whose reader is not available.
/// \code
///   std::unique_ptr<distorch::weight_source> src = distorch::open_weights("model.safetensors");
///   at::Tensor w = src->load("head.weight");
/// \endcode
inline std::unique_ptr<weight_source> open_weights(const std::string& path) {
  switch (sniff_weight_format(path)) {
    case weight_format::safetensors:
      return std::make_unique<safetensors_source>(path);
    case weight_format::safetensors_index:
      return std::make_unique<safetensors_index_source>(path);
    case weight_format::gguf:
      return std::make_unique<gguf_source>(path);
    case weight_format::torch_zip:
      return std::make_unique<torch_zip_source>(path);
    case weight_format::torch_legacy:
      throw format_error({"opening weight file", path, std::nullopt,
                          "legacy (pre-1.6, non-zip) torch.save format is not supported",
                          "re-save it in Python: torch.save(torch.load(f), f2) writes the zip format"});
    case weight_format::unknown:
      break;
  }
  throw format_error({"opening weight file", path, std::nullopt,
                      "not a safetensors, safetensors index, GGUF or PyTorch zip file",
                      "pass a .safetensors, model.safetensors.index.json, .gguf, .bin or .pt file"});
}

}  // namespace distorch::inline v0
