#pragma once
/// \file
/// The safetensors header parser: pure C++20 over a byte span, no LibTorch. It validates the whole
/// header against the file size and returns tensor descriptors (name, dtype, shape, byte range);
/// io/torch_tensor.hpp turns a descriptor plus the file mapping into an `at::Tensor`.
///
/// Layout: little-endian u64 N, then N bytes of UTF-8 JSON, then the data buffer. The JSON maps
/// tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data
/// buffer), plus an optional "__metadata__" object of string → string.
///
/// Descriptors come out sorted by data offset (ties in header order), which is the order the bytes
/// sit in the file. Model order is not recorded by the format: files written by the Python
/// `safetensors` package are sorted by dtype and then name, so file order is the only order that is
/// both stable and meaningful (it is also the fastest order to read).
///
/// Example:
/// \code
///   auto file = distorch::mapped_file::open("model.safetensors");
///   distorch::safetensors_header h = distorch::parse_safetensors(file->bytes(), file->path());
///   for (const auto& t : h.tensors) std::cout << t.name << ' ' << t.dtype_name << '\n';
/// \endcode

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "distorch/core/error.hpp"
#include "distorch/model/dtype.hpp"
#include "distorch/model/inventory.hpp"

namespace distorch::inline v0 {

/// Largest header the reader accepts, as in the reference implementation: a larger N is far more
/// likely to be a corrupt or hostile file than a real header.
inline constexpr std::uint64_t safetensors_max_header_bytes = 100'000'000;

/// One dtype name of the safetensors specification.
struct safetensors_dtype_info {
  std::string_view name;  ///< "F32", "BF16", "F8_E4M3", ...
  dtype type;             ///< `opaque` for the sub-byte kinds, which have no element type here
  unsigned bits;          ///< bits per element
};

/// Every dtype name the specification defines. Sub-byte kinds (F4, F6_*) parse and are sized by
/// bits; they have no `dtype` of their own and cannot be materialized.
inline constexpr std::array<safetensors_dtype_info, 20> safetensors_dtypes{{
    {"F64", dtype::f64, 64},   {"F32", dtype::f32, 32},       {"F16", dtype::f16, 16},
    {"BF16", dtype::bf16, 16}, {"I64", dtype::i64, 64},       {"I32", dtype::i32, 32},
    {"I16", dtype::i16, 16},   {"I8", dtype::i8, 8},          {"U8", dtype::u8, 8},
    {"BOOL", dtype::boolean, 8}, {"U16", dtype::u16, 16},     {"U32", dtype::u32, 32},
    {"U64", dtype::u64, 64},   {"F8_E4M3", dtype::f8_e4m3, 8}, {"F8_E5M2", dtype::f8_e5m2, 8},
    {"F8_E8M0", dtype::f8_e8m0, 8}, {"C64", dtype::c64, 64},  {"F4", dtype::opaque, 4},
    {"F6_E2M3", dtype::opaque, 6}, {"F6_E3M2", dtype::opaque, 6},
}};

/// The specification's dtype entry for a name, or nullptr for an unknown name.
/// \code
///   distorch::safetensors_dtype("BF16")->type;   // distorch::dtype::bf16
/// \endcode
constexpr const safetensors_dtype_info* safetensors_dtype(std::string_view name) noexcept {
  for (const auto& d : safetensors_dtypes)
    if (d.name == name) return &d;
  return nullptr;
}

/// The specification's name of a dtype ("F32" for `dtype::f32`), or an empty view when the format
/// has none (complex128, opaque).
/// \code
///   distorch::safetensors_dtype_name(distorch::dtype::f16);   // "F16"
/// \endcode
constexpr std::string_view safetensors_dtype_name(dtype t) noexcept {
  if (t == dtype::opaque) return {};
  for (const auto& d : safetensors_dtypes)
    if (d.type == t) return d.name;
  return {};
}

/// One tensor of a safetensors file, as described by its header.
struct safetensors_tensor {
  std::string name;
  std::string dtype_name;           ///< as written: "F32", "F8_E4M3", ...
  dtype type = dtype::f32;          ///< `opaque` for sub-byte kinds
  std::vector<std::int64_t> shape;  ///< empty for a 0-d tensor
  std::uint64_t begin = 0;          ///< offset of the first byte in the data buffer
  std::uint64_t end = 0;            ///< one past the last byte in the data buffer
  /// Bytes the tensor occupies in the data buffer.
  std::uint64_t bytes() const noexcept { return end - begin; }
  friend bool operator==(const safetensors_tensor&, const safetensors_tensor&) = default;
};

/// A parsed and validated safetensors header.
struct safetensors_header {
  std::uint64_t json_bytes = 0;   ///< N, the header length as stored
  std::uint64_t data_offset = 0;  ///< 8 + N: where the data buffer starts in the file
  std::uint64_t data_bytes = 0;   ///< length of the data buffer
  std::map<std::string, std::string> metadata;  ///< "__metadata__"
  std::vector<safetensors_tensor> tensors;      ///< sorted by data offset

  /// The tensor of that name, or nullptr. Linear; sources keep their own index.
  const safetensors_tensor* find(std::string_view name) const noexcept {
    for (const auto& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }

  /// Inventory records, in file order. Sub-byte tensors carry explicit byte counts.
  std::vector<tensor_record> records() const {
    std::vector<tensor_record> out;
    out.reserve(tensors.size());
    for (const auto& t : tensors) {
      tensor_record r{t.name, t.type, t.shape};
      r.bytes = t.type == dtype::opaque ? t.bytes() : 0;
      out.push_back(std::move(r));
    }
    return out;
  }
};

namespace detail {

inline std::uint64_t safetensors_u64_le(const std::byte* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | std::to_integer<std::uint64_t>(p[i]);
  return v;
}

/// Offset of the first byte that breaks UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing
/// above U+10FFFF), or nullopt when the text is valid. Checked by hand so the error can name the
/// exact byte, whatever the JSON library would say.
inline std::optional<std::size_t> first_invalid_utf8(std::span<const std::byte> text) noexcept {
  const std::size_t n = text.size();
  std::size_t i = 0;
  auto at = [&](std::size_t k) { return std::to_integer<unsigned>(text[k]); };
  while (i < n) {
    const unsigned c = at(i);
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (at(i + 1) < lo || at(i + 1) > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (at(i + k) < 0x80 || at(i + k) > 0xBF) return i;
    i += len;
  }
  return std::nullopt;
}

/// Deepest nesting of JSON arrays and objects outside strings. A header needs three levels; the
/// limit keeps a hostile header from driving the JSON library into deep recursion.
inline std::size_t json_nesting_depth(std::string_view text) noexcept {
  std::size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char ch : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (ch == '\\') escaped = true;
      else if (ch == '"') in_string = false;
      continue;
    }
    if (ch == '"') in_string = true;
    else if (ch == '[' || ch == '{') deepest = std::max(deepest, ++depth);
    else if ((ch == ']' || ch == '}') && depth > 0) --depth;
  }
  return deepest;
}

inline constexpr std::size_t safetensors_max_json_depth = 16;

[[noreturn]] inline void safetensors_fail(std::string_view subject_path, std::string subject,
                                          std::optional<error_position> position, std::string problem,
                                          std::string fix) {
  // With no tensor to name, the file itself is the subject.
  if (subject.empty())
    throw format_error({"reading safetensors header", std::string(subject_path), std::move(position), std::move(problem),
                        std::move(fix)});
  throw format_error({"reading safetensors header of " + std::string(subject_path), std::move(subject),
                      std::move(position), std::move(problem), std::move(fix)});
}

/// Parses JSON and rejects a key that appears twice in any one object (nlohmann would keep the
/// last one silently). Returns the parsed document; throws format_error.
inline nlohmann::ordered_json parse_json_unique_keys(std::string_view text, std::uint64_t base_offset,
                                                     std::string_view path, std::string_view what = "header") {
  std::vector<std::unordered_set<std::string>> open_objects;
  std::string duplicate;
  auto callback = [&](int, nlohmann::ordered_json::parse_event_t event, nlohmann::ordered_json& value) {
    using ev = nlohmann::ordered_json::parse_event_t;
    if (event == ev::object_start) {
      open_objects.emplace_back();
    } else if (event == ev::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == ev::key && !open_objects.empty() && duplicate.empty()) {
      if (!open_objects.back().insert(value.get<std::string>()).second) duplicate = value.get<std::string>();
    }
    return true;
  };
  nlohmann::ordered_json doc;
  try {
    doc = nlohmann::ordered_json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true);
  } catch (const nlohmann::json::parse_error& e) {
    const std::uint64_t pos = e.byte == 0 ? 0 : e.byte - 1;
    safetensors_fail(path, "", error_position{"offset", base_offset + pos},
                     std::string(what) + " is not valid JSON: " + e.what(),
                     "write the header as one JSON object (the file may be truncated or not safetensors)");
  } catch (const nlohmann::json::exception& e) {  // e.g. a number too large for any JSON type
    safetensors_fail(path, "", error_position{"offset", base_offset},
                     std::string(what) + " is not valid JSON: " + e.what(),
                     "write the header as one JSON object (the file may be truncated or not safetensors)");
  }
  if (!duplicate.empty())
    safetensors_fail(path, duplicate, std::nullopt, "name appears twice in the " + std::string(what),
                     "each tensor name (and each key of an entry) must appear once");
  return doc;
}

inline bool safetensors_checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  return !__builtin_mul_overflow(a, b, &out);
}

inline std::uint64_t json_offset(const nlohmann::ordered_json& v, std::string_view path, const std::string& name,
                                 const char* which) {
  if (!v.is_number_unsigned())
    safetensors_fail(path, name, std::nullopt, std::string("data_offsets ") + which + " is not a non-negative integer",
                     "write data_offsets as [begin, end] byte offsets into the data buffer");
  return v.get<std::uint64_t>();
}

inline safetensors_tensor parse_tensor_entry(const std::string& name, const nlohmann::ordered_json& entry,
                                             std::string_view path) {
  const std::string fix_entry = R"(write each tensor as {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]})";
  if (!entry.is_object()) safetensors_fail(path, name, std::nullopt, "tensor entry is not a JSON object", fix_entry);
  const auto dt = entry.find("dtype");
  const auto sh = entry.find("shape");
  const auto off = entry.find("data_offsets");
  if (dt == entry.end() || sh == entry.end() || off == entry.end())
    safetensors_fail(path, name, std::nullopt, "tensor entry lacks dtype, shape or data_offsets", fix_entry);
  if (!dt->is_string()) safetensors_fail(path, name, std::nullopt, "dtype is not a string", fix_entry);
  safetensors_tensor t;
  t.name = name;
  t.dtype_name = dt->get<std::string>();
  const auto* info = safetensors_dtype(t.dtype_name);
  if (info == nullptr)
    safetensors_fail(path, name, std::nullopt, "unknown dtype '" + t.dtype_name + "'",
                     "use a dtype of the safetensors specification (F64, F32, F16, BF16, I64, I32, I16, I8, U8, "
                     "BOOL, U16, U32, U64, F8_E4M3, F8_E5M2, F8_E8M0, C64, F4, F6_E2M3, F6_E3M2)");
  t.type = info->type;
  if (!sh->is_array()) safetensors_fail(path, name, std::nullopt, "shape is not an array", fix_entry);
  std::uint64_t numel = 1;
  bool overflow = false;
  for (const auto& d : *sh) {
    if (!d.is_number_unsigned())
      safetensors_fail(path, name, std::nullopt, "shape holds something other than a non-negative integer", fix_entry);
    const auto dim = d.get<std::uint64_t>();
    if (dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) overflow = true;
    t.shape.push_back(static_cast<std::int64_t>(dim));
    if (!overflow && !safetensors_checked_mul(numel, dim, numel)) overflow = true;
  }
  std::uint64_t bits = 0;
  if (overflow || !safetensors_checked_mul(numel, info->bits, bits) ||
      numel > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
    safetensors_fail(path, name, std::nullopt, "shape's element count times the dtype size overflows 64 bits",
                     "the shape is corrupt; write the real shape");
  if (bits % 8 != 0)
    safetensors_fail(path, name, std::nullopt, "sub-byte tensor does not fill a whole number of bytes",
                     "pad the tensor to a multiple of 8 bits");
  if (!off->is_array() || off->size() != 2)
    safetensors_fail(path, name, std::nullopt, "data_offsets is not a pair [begin, end]", fix_entry);
  t.begin = json_offset((*off)[0], path, name, "begin");
  t.end = json_offset((*off)[1], path, name, "end");
  if (t.end < t.begin)
    safetensors_fail(path, name, std::nullopt,
                     "data_offsets are not ordered: end " + std::to_string(t.end) + " < begin " + std::to_string(t.begin),
                     "write data_offsets as [begin, end] with begin <= end");
  if (t.end - t.begin != bits / 8)
    safetensors_fail(path, name, std::nullopt,
                     "data_offsets span " + std::to_string(t.end - t.begin) + " bytes but shape x dtype needs " +
                         std::to_string(bits / 8),
                     "the shape, dtype or offsets are corrupt; rewrite the file");
  return t;
}

}  // namespace detail

/// Parses and validates a safetensors header. `file` is the whole file (for a mapping, only the
/// header pages are touched) or at least its first 8 + N bytes, with `file_size` the full size when
/// only a prefix is given. `path` names the file in errors. Throws `format_error` naming the
/// tensor or byte offset for every malformed input; never reads outside `file`.
/// \code
///   auto h = distorch::parse_safetensors(bytes, "model.safetensors");
///   h.metadata["format"];   // "pt"
/// \endcode
inline safetensors_header parse_safetensors(std::span<const std::byte> file, std::string_view path,
                                            std::optional<std::uint64_t> file_size = std::nullopt) {
  using detail::safetensors_fail;
  const std::uint64_t size = file_size.value_or(file.size());
  if (size < 8)
    safetensors_fail(path, "", error_position{"offset", 0},
                     "file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length",
                     "the file is truncated or not safetensors");
  if (file.size() < 8)
    safetensors_fail(path, "", error_position{"offset", 0}, "only a prefix of the header length was given",
                     "pass at least the first 8 bytes of the file");
  safetensors_header h;
  h.json_bytes = detail::safetensors_u64_le(file.data());
  if (h.json_bytes > safetensors_max_header_bytes)
    safetensors_fail(path, "", error_position{"offset", 0},
                     "header length " + std::to_string(h.json_bytes) + " exceeds the limit of 100,000,000 bytes",
                     "the file is corrupt or not safetensors");
  // N <= 1e8 here, so 8 + N cannot overflow; compare without adding anyway.
  if (h.json_bytes > size - 8)
    safetensors_fail(path, "", error_position{"offset", 0},
                     "header length " + std::to_string(h.json_bytes) + " runs past the end of the " +
                         std::to_string(size) + "-byte file",
                     "the file is truncated or not safetensors");
  h.data_offset = 8 + h.json_bytes;
  h.data_bytes = size - h.data_offset;
  if (file.size() < h.data_offset)
    safetensors_fail(path, "", error_position{"offset", 8}, "only a prefix of the header was given",
                     "pass at least the first 8 + N bytes of the file");
  const auto json_span = file.subspan(8, static_cast<std::size_t>(h.json_bytes));
  if (const auto bad = detail::first_invalid_utf8(json_span))
    safetensors_fail(path, "", error_position{"offset", 8 + *bad}, "header is not valid UTF-8",
                     "the header must be UTF-8 JSON; the file is corrupt");
  const std::string_view text(reinterpret_cast<const char*>(json_span.data()), json_span.size());
  if (detail::json_nesting_depth(text) > detail::safetensors_max_json_depth)
    safetensors_fail(path, "", error_position{"offset", 8}, "header JSON nests deeper than any safetensors header",
                     "the file is corrupt or not safetensors");
  const auto doc = detail::parse_json_unique_keys(text, 8, path);
  if (!doc.is_object())
    safetensors_fail(path, "", error_position{"offset", 8}, "header is not a JSON object",
                     "write the header as one JSON object of tensor entries");

  for (const auto& [key, value] : doc.items()) {
    if (key == "__metadata__") {
      if (!value.is_object())
        safetensors_fail(path, key, std::nullopt, "__metadata__ is not an object",
                         "write __metadata__ as an object of string values");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string())
          safetensors_fail(path, "__metadata__." + mk, std::nullopt, "metadata value is not a string",
                           "write every __metadata__ value as a string");
        h.metadata.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    h.tensors.push_back(detail::parse_tensor_entry(key, value, path));
  }

  // Contiguity: sorted by begin (ties keep header order), each must start where the last ended,
  // the first at 0, and the last must end exactly at the end of the file.
  std::stable_sort(h.tensors.begin(), h.tensors.end(),
                   [](const safetensors_tensor& a, const safetensors_tensor& b) { return a.begin < b.begin; });
  std::uint64_t expected = 0;
  for (const auto& t : h.tensors) {
    if (t.begin < expected)
      safetensors_fail(path, t.name, error_position{"offset", h.data_offset + t.begin},
                       "data overlaps the previous tensor, which ends at buffer offset " + std::to_string(expected),
                       "every tensor must own its bytes; rewrite the file");
    if (t.begin > expected)
      safetensors_fail(path, t.name, error_position{"offset", h.data_offset + expected},
                       "hole of " + std::to_string(t.begin - expected) + " bytes before this tensor's data",
                       "tensors must be packed with no gaps; rewrite the file");
    expected = t.end;
  }
  if (expected > h.data_bytes)
    safetensors_fail(path, h.tensors.back().name, error_position{"offset", h.data_offset + h.tensors.back().begin},
                     "data ends at buffer offset " + std::to_string(expected) + ", past the " +
                         std::to_string(h.data_bytes) + "-byte data buffer",
                     "the file is truncated");
  if (expected < h.data_bytes)
    safetensors_fail(path, "", error_position{"offset", h.data_offset + expected},
                     std::to_string(h.data_bytes - expected) + " trailing bytes after the last tensor",
                     "the data buffer must be covered exactly; rewrite the file");
  return h;
}

}  // namespace distorch::inline v0
