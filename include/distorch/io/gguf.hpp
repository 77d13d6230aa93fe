#pragma once
/// \file
/// GGUF (versions 2 and 3) parsed from the bytes of a whole file: the metadata key/values (all
/// 13 value types, and arrays of them), the tensor infos, `general.alignment` and the aligned data
/// section. The parser makes every check llama.cpp's gguf.cpp makes, and checks each tensor's
/// bytes against the file size, so a bad file is a `format_error` with the byte offset, never an
/// out-of-bounds read or an allocation the file did not pay for. Pure C++20 (no LibTorch): it
/// builds with clang's libFuzzer. io/gguf_source.hpp turns the tensor infos into tensors.
///
/// Example:
/// \code
///   auto mapping = distorch::mapped_file::open("model.gguf");
///   distorch::gguf_file gguf = distorch::parse_gguf(mapping->bytes(), "model.gguf");
///   for (const auto& t : gguf.tensors)
///     std::cout << t.name << ' ' << distorch::ggml_type_name(t.type) << ' ' << t.bytes << '\n';
///   if (const auto* arch = gguf.find("general.architecture")) std::cout << arch->to_string() << '\n';
/// \endcode

#include <bit>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/io/ggml_types.hpp"
#include "distorch/model/inventory.hpp"

namespace distorch::inline v0 {

/// GGUF metadata value types, as stored in the file.
enum class gguf_value_type : std::uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7, string = 8, array = 9,
  u64 = 10, i64 = 11, f64 = 12,
};

/// gguf.cpp's short name of a value type: "u32", "str", "arr", ...
/// \code distorch::gguf_value_type_name(distorch::gguf_value_type::f64);   // "f64" \endcode
constexpr std::string_view gguf_value_type_name(gguf_value_type t) noexcept {
  constexpr std::string_view names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32",
                                        "bool", "str", "arr", "u64", "i64", "f64"};
  const auto i = static_cast<std::uint32_t>(t);
  return i < 13 ? names[i] : std::string_view{"unknown"};
}

/// One metadata value: a scalar or an array, with one element type.
struct gguf_value {
  gguf_value_type type = gguf_value_type::u8;  ///< element type; never `array`
  bool is_array = false;
  std::vector<std::uint64_t> numbers;  ///< raw little-endian bits of each non-string element
  std::vector<std::string> strings;    ///< each string element

  /// Number of elements (1 for a scalar).
  std::size_t size() const noexcept { return type == gguf_value_type::string ? strings.size() : numbers.size(); }

  /// True for the eight integer types (bool is not one).
  bool is_integer() const noexcept {
    switch (type) {
      case gguf_value_type::u8: case gguf_value_type::i8: case gguf_value_type::u16: case gguf_value_type::i16:
      case gguf_value_type::u32: case gguf_value_type::i32: case gguf_value_type::u64: case gguf_value_type::i64:
        return true;
      default:
        return false;
    }
  }

  /// Element `i` of an integer value as int64, or nullopt (not an integer, out of range, or a u64
  /// above INT64_MAX).
  /// \code auto n = gguf.find("llama.block_count")->get_int();   // e.g. 32 \endcode
  std::optional<std::int64_t> get_int(std::size_t i = 0) const noexcept {
    if (!is_integer() || i >= numbers.size()) return std::nullopt;
    const std::uint64_t bits = numbers[i];
    switch (type) {
      case gguf_value_type::i8: return static_cast<std::int8_t>(bits);
      case gguf_value_type::i16: return static_cast<std::int16_t>(bits);
      case gguf_value_type::i32: return static_cast<std::int32_t>(bits);
      case gguf_value_type::i64: return static_cast<std::int64_t>(bits);
      case gguf_value_type::u64:
        if (bits > static_cast<std::uint64_t>(INT64_MAX)) return std::nullopt;
        return static_cast<std::int64_t>(bits);
      default: return static_cast<std::int64_t>(bits);  // u8, u16, u32 were zero-extended
    }
  }

  /// Element `i` of a f32 or f64 value.
  /// \code double eps = *gguf.find("llama.attention.layer_norm_rms_epsilon")->get_float(); \endcode
  std::optional<double> get_float(std::size_t i = 0) const noexcept {
    if (i >= numbers.size()) return std::nullopt;
    if (type == gguf_value_type::f32) return std::bit_cast<float>(static_cast<std::uint32_t>(numbers[i]));
    if (type == gguf_value_type::f64) return std::bit_cast<double>(numbers[i]);
    return std::nullopt;
  }

  /// Element `i` of a bool value (any nonzero byte is true, as in gguf.cpp).
  /// \code bool causal = *gguf.find("bert.attention.causal")->get_bool(); \endcode
  std::optional<bool> get_bool(std::size_t i = 0) const noexcept {
    if (type != gguf_value_type::boolean || i >= numbers.size()) return std::nullopt;
    return numbers[i] != 0;
  }

  /// Element `i` of a string value, or nullptr.
  /// \code const std::string* arch = gguf.find("general.architecture")->get_string(); \endcode
  const std::string* get_string(std::size_t i = 0) const noexcept {
    return type == gguf_value_type::string && i < strings.size() ? &strings[i] : nullptr;
  }

  /// Printable form: a scalar as its value, an array as "[a, b, ...]" with at most `max_items`
  /// elements shown and the count when some are left out.
  /// \code gguf.find("tokenizer.ggml.tokens")->to_string(3);   // "[\"<s>\", \"</s>\", \"a\", ... (32000 items)]" \endcode
  std::string to_string(std::size_t max_items = 64) const {
    if (!is_array) return element_string(0, false);
    std::string out = "[";
    const std::size_t n = size();
    for (std::size_t i = 0; i < n && i < max_items; ++i) {
      if (i != 0) out += ", ";
      out += element_string(i, true);
    }
    if (n > max_items) out += (max_items == 0 ? "... (" : ", ... (") + std::to_string(n) + " items)";
    out += ']';
    return out;
  }

  friend bool operator==(const gguf_value&, const gguf_value&) = default;

 private:
  std::string element_string(std::size_t i, bool quote) const {
    if (type == gguf_value_type::string) return quote ? '"' + strings[i] + '"' : strings[i];
    if (type == gguf_value_type::boolean) return numbers[i] != 0 ? "true" : "false";
    if (const auto f = get_float(i)) {
      char buffer[64];
      const auto result = type == gguf_value_type::f32
                              ? std::to_chars(buffer, buffer + sizeof buffer, static_cast<float>(*f))
                              : std::to_chars(buffer, buffer + sizeof buffer, *f);
      return std::string(buffer, result.ptr);
    }
    if (type == gguf_value_type::u64) return std::to_string(numbers[i]);
    return std::to_string(*get_int(i));
  }
};

/// One metadata entry.
struct gguf_kv {
  std::string key;
  gguf_value value;
  friend bool operator==(const gguf_kv&, const gguf_kv&) = default;
};

/// One tensor info, with what the parser derived from it.
struct gguf_tensor_info {
  std::string name;
  std::vector<std::int64_t> dims;   ///< ggml order (ne[0], the contiguous one, first); n_dims entries
  ggml_type type = ggml_type::f32;
  std::uint64_t offset = 0;         ///< from the start of the data section, as stored
  std::uint64_t file_offset = 0;    ///< from the start of the file
  std::uint64_t bytes = 0;          ///< bytes of its data
  std::int64_t numel = 1;           ///< elements
  std::vector<std::int64_t> shape;  ///< PyTorch order: reversed dims, or comfy.gguf.orig_shape.<name>
  friend bool operator==(const gguf_tensor_info&, const gguf_tensor_info&) = default;
};

/// A parsed GGUF file: everything but the tensor data, which stays in the caller's bytes.
struct gguf_file {
  std::uint32_t version = 3;
  std::uint64_t alignment = 32;      ///< general.alignment, or the default 32
  std::uint64_t data_offset = 0;     ///< where the data section starts in the file
  std::uint64_t data_size = 0;       ///< bytes of the data section, every tensor padded to alignment
  std::vector<gguf_kv> metadata;     ///< in file order
  std::vector<gguf_tensor_info> tensors;  ///< in file order

  /// The value of a metadata key, or nullptr.
  /// \code if (const auto* v = gguf.find("general.name")) std::cout << v->to_string(); \endcode
  const gguf_value* find(std::string_view key) const noexcept {
    for (const auto& kv : metadata)
      if (kv.key == key) return &kv.value;
    return nullptr;
  }

  /// The tensor info of a name, or nullptr.
  /// \code const auto* t = gguf.find_tensor("token_embd.weight"); \endcode
  const gguf_tensor_info* find_tensor(std::string_view name) const {
    const auto it = tensor_index.find(std::string(name));
    return it == tensor_index.end() ? nullptr : &tensors[it->second];
  }

  std::unordered_map<std::string, std::size_t> tensor_index;  ///< name → position in `tensors`
};

/// Limits gguf.cpp enforces.
inline constexpr std::uint64_t gguf_max_string_length = std::uint64_t{1} << 30;
/// Largest metadata array accepted, checked before anything is allocated for it.
inline constexpr std::uint64_t gguf_max_array_elements = std::uint64_t{1} << 30;
inline constexpr std::size_t gguf_max_tensor_name = 64;  ///< ggml's GGML_MAX_NAME: names must be shorter
/// ggml's GGML_MAX_DIMS: tensors have at most four dimensions.
inline constexpr std::uint32_t gguf_max_dims = 4;
/// Data alignment when the file has no `general.alignment` key.
inline constexpr std::uint64_t gguf_default_alignment = 32;

namespace detail {

// The fewest bytes a key/value pair (8-byte length, a 1-byte key, type, a 1-byte value) and a
// tensor info (8-byte length, empty name, n_dims, type, offset) can take: a count larger than
// the remaining bytes allow is a lie, found before anything is allocated for it.
inline constexpr std::uint64_t gguf_min_kv_bytes = 8 + 1 + 4 + 1;
inline constexpr std::uint64_t gguf_min_tensor_info_bytes = 8 + 4 + 4 + 8;

inline std::uint64_t gguf_value_size(gguf_value_type t) noexcept {
  switch (t) {
    case gguf_value_type::u8: case gguf_value_type::i8: case gguf_value_type::boolean: return 1;
    case gguf_value_type::u16: case gguf_value_type::i16: return 2;
    case gguf_value_type::u32: case gguf_value_type::i32: case gguf_value_type::f32: return 4;
    case gguf_value_type::u64: case gguf_value_type::i64: case gguf_value_type::f64: return 8;
    case gguf_value_type::string: return 8;  // at least its length prefix
    default: return 0;
  }
}

class gguf_parser {
 public:
  gguf_parser(std::span<const std::byte> bytes, std::string_view label) : bytes_(bytes), label_(label) {}

  gguf_file parse() {
    gguf_file out;
    read_header(out);
    const std::uint64_t n_tensors = read_count("tensor", gguf_min_tensor_info_bytes, 0);
    const std::uint64_t n_kv = read_count("metadata key/value", gguf_min_kv_bytes, n_tensors * gguf_min_tensor_info_bytes);
    read_metadata(out, n_kv);
    read_alignment(out);
    read_tensor_infos(out, n_tensors);
    place_data(out);
    apply_orig_shapes(out);
    return out;
  }

 private:
  [[noreturn]] void fail(std::string_view part, std::string subject, std::uint64_t at, std::string problem,
                         std::string fix) const {
    std::string doing = "reading GGUF ";
    doing += part;
    if (!label_.empty() && subject != label_) {
      doing += " of ";
      doing += label_;
    }
    throw format_error({std::move(doing), std::move(subject), error_position{"offset", at}, std::move(problem),
                        std::move(fix)});
  }

  std::uint64_t remaining() const noexcept { return bytes_.size() - pos_; }

  void need(std::uint64_t n, std::string_view part, const std::string& subject, std::string_view what) const {
    if (n > remaining())
      fail(part, subject, pos_,
           "the file ends inside " + std::string(what) + " (" + std::to_string(n) + " bytes needed, " +
               std::to_string(remaining()) + " left)",
           "the file is truncated: download or convert it again");
  }

  std::uint64_t read_le(unsigned width) noexcept {  // callers checked `need` first
    std::uint64_t v = 0;
    for (unsigned i = 0; i < width; ++i) v |= static_cast<std::uint64_t>(std::to_integer<std::uint8_t>(bytes_[pos_ + i])) << (8 * i);
    pos_ += width;
    return v;
  }

  std::uint64_t read_u(unsigned width, std::string_view part, const std::string& subject, std::string_view what) {
    need(width, part, subject, what);
    return read_le(width);
  }

  std::string read_string(std::string_view part, const std::string& subject, std::string_view what) {
    const std::uint64_t at = pos_;
    const std::uint64_t length = read_u(8, part, subject, what);
    if (length > gguf_max_string_length)
      fail(part, subject, at,
           std::string(what) + " claims " + std::to_string(length) + " bytes, more than the 1 GiB GGUF allows",
           "the length prefix is corrupt: convert the file again");
    if (length > remaining())
      fail(part, subject, at,
           std::string(what) + " claims " + std::to_string(length) + " bytes but only " +
               std::to_string(remaining()) + " remain in the file",
           "the file is truncated or its length prefix is corrupt: download or convert it again");
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), static_cast<std::size_t>(length));
    pos_ += length;
    return s;
  }

  void read_header(gguf_file& out) {
    const std::string subject{label_};
    if (bytes_.size() < 4)
      fail("header", subject, 0, "the file has " + std::to_string(bytes_.size()) + " bytes, too few for the GGUF magic",
           "pass a GGUF file");
    const std::string_view magic(reinterpret_cast<const char*>(bytes_.data()), 4);
    if (magic != "GGUF") {
      std::string shown;
      for (char c : magic) shown += (c >= 0x20 && c < 0x7f) ? c : '?';
      const bool legacy = magic == "lmgg" || magic == "fmgg" || magic == "tjgg" || magic == "algg" || magic == "GGML" ||
                          magic == "GGJT" || magic == "GGLA";
      fail("header", subject, 0, "magic is '" + shown + "', not 'GGUF'",
           legacy ? "this is a pre-GGUF ggml/ggjt file: convert it with llama.cpp's convert_llama_ggml_to_gguf.py"
                  : "pass a GGUF file (.gguf)");
    }
    pos_ = 4;
    const std::uint64_t version = read_u(4, "header", subject, "the version");
    if (version == 0)
      fail("header", subject, 4, "version 0 is not a GGUF version", "the header is corrupt: convert the file again");
    if ((version & 0xffffu) == 0)
      fail("header", subject, 4,
           "version " + std::to_string(version) + " is a byte-swapped version: the file is big-endian",
           "convert it to little-endian with gguf-py's gguf_convert_endian.py");
    if (version == 1)
      fail("header", subject, 4, "GGUF version 1 is no longer supported (32-bit counts and lengths)",
           "convert the model again with a current llama.cpp convert script, which writes version 3");
    if (version > 3)
      fail("header", subject, 4, "GGUF version " + std::to_string(version) + " is newer than the versions 2 and 3 distorch reads",
           "update distorch, or write the file as GGUF version 3");
    out.version = static_cast<std::uint32_t>(version);
  }

  std::uint64_t read_count(std::string_view what, std::uint64_t min_bytes, std::uint64_t reserved) {
    const std::string subject{label_};
    const std::uint64_t at = pos_;
    const std::uint64_t n = read_u(8, "header", subject, "the " + std::string(what) + " count");
    // Both counts are read before either list, so the tensor infos' minimum is set aside for the
    // key/value check.
    const std::uint64_t left = remaining() > reserved ? remaining() - reserved : 0;
    if (n > left / min_bytes)
      fail("header", subject, at,
           std::string(what) + " count " + std::to_string(n) + " cannot fit in the " + std::to_string(remaining()) +
               " bytes after the header (each takes at least " + std::to_string(min_bytes) + " bytes)",
           "the header is corrupt or the file truncated: convert it again");
    return n;
  }

  gguf_value read_value(const std::string& key) {
    const std::uint64_t type_at = pos_;
    std::uint64_t type = read_u(4, "metadata", key, "the value type");
    gguf_value value;
    std::uint64_t n = 1;
    if (type == static_cast<std::uint32_t>(gguf_value_type::array)) {
      value.is_array = true;
      const std::uint64_t element_at = pos_;
      type = read_u(4, "metadata", key, "the array element type");
      if (type == static_cast<std::uint32_t>(gguf_value_type::array))
        fail("metadata", key, element_at, "arrays of arrays are not part of GGUF",
             "store nested data as separate keys or as a string");
      if (type > 12)
        fail("metadata", key, element_at, "array element type " + std::to_string(type) + " is not a GGUF value type (0..12)",
             "the file is corrupt: convert it again");
      const std::uint64_t count_at = pos_;
      n = read_u(8, "metadata", key, "the array length");
      if (n > gguf_max_array_elements)
        fail("metadata", key, count_at,
             "array length " + std::to_string(n) + " exceeds the 2^30 elements GGUF allows",
             "the array length is corrupt: convert the file again");
      const std::uint64_t element_size = gguf_value_size(static_cast<gguf_value_type>(type));
      if (n > remaining() / element_size)
        fail("metadata", key, count_at,
             "array of " + std::to_string(n) + " " + std::string(gguf_value_type_name(static_cast<gguf_value_type>(type))) +
                 " needs at least " + std::to_string(n * element_size) + " bytes but only " +
                 std::to_string(remaining()) + " remain in the file",
             "the file is truncated or the array length is corrupt: convert it again");
    } else if (type > 12) {
      fail("metadata", key, type_at, "value type " + std::to_string(type) + " is not a GGUF value type (0..12)",
           "the file is corrupt: convert it again");
    }
    value.type = static_cast<gguf_value_type>(type);
    if (value.type == gguf_value_type::string) {
      value.strings.reserve(static_cast<std::size_t>(n));
      for (std::uint64_t i = 0; i < n; ++i) value.strings.push_back(read_string("metadata", key, "a string value"));
    } else {
      const auto width = static_cast<unsigned>(gguf_value_size(value.type));
      need(n * width, "metadata", key, "the value");
      value.numbers.resize(static_cast<std::size_t>(n));
      for (auto& v : value.numbers) v = read_le(width);
    }
    return value;
  }

  void read_metadata(gguf_file& out, std::uint64_t n_kv) {
    std::unordered_set<std::string> seen;
    out.metadata.reserve(static_cast<std::size_t>(n_kv));
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      const std::uint64_t key_at = pos_;
      const std::string subject = "key " + std::to_string(i);
      std::string key = read_string("metadata", subject, "a key");
      if (key.empty())
        fail("metadata", subject, key_at, "the key is empty", "every metadata key needs a name: convert the file again");
      if (!seen.insert(key).second)
        fail("metadata", key, key_at, "the key appears twice", "each metadata key must be unique: convert the file again");
      gguf_value value = read_value(key);
      out.metadata.push_back({std::move(key), std::move(value)});
    }
  }

  void read_alignment(gguf_file& out) {
    out.alignment = gguf_default_alignment;
    const gguf_value* v = out.find("general.alignment");
    if (v == nullptr) return;
    if (v->is_array || v->type != gguf_value_type::u32)
      fail("metadata", "general.alignment", header_end_hint(),
           std::string("general.alignment must be a u32 but is ") +
               (v->is_array ? "an array of " : "a ") + std::string(gguf_value_type_name(v->type)),
           "write general.alignment as a u32 power of two such as 32");
    const std::uint64_t a = v->numbers[0];
    if (a == 0 || (a & (a - 1)) != 0)
      fail("metadata", "general.alignment", header_end_hint(),
           "alignment " + std::to_string(a) + " is not a nonzero power of two",
           "write general.alignment as a power of two such as 32");
    out.alignment = a;
  }

  // Errors about a key/value found after all of them were read point at the end of the metadata.
  std::uint64_t header_end_hint() const noexcept { return pos_; }

  void read_tensor_infos(gguf_file& out, std::uint64_t n_tensors) {
    out.tensors.reserve(static_cast<std::size_t>(n_tensors));
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      gguf_tensor_info info;
      const std::uint64_t name_at = pos_;
      const std::string index_subject = "tensor " + std::to_string(i);
      info.name = read_string("tensor info", index_subject, "a tensor name");
      if (info.name.size() >= gguf_max_tensor_name)
        fail("tensor info", info.name, name_at,
             "the name has " + std::to_string(info.name.size()) + " bytes; ggml names must be shorter than 64",
             "rename the tensor to fewer than 64 bytes");
      if (out.tensor_index.contains(info.name))
        fail("tensor info", info.name, name_at, "the tensor name appears twice",
             "each tensor must have a unique name: convert the file again");

      const std::uint64_t dims_at = pos_;
      const std::uint64_t n_dims = read_u(4, "tensor info", info.name, "the dimension count");
      if (n_dims > gguf_max_dims)
        fail("tensor info", info.name, dims_at,
             std::to_string(n_dims) + " dimensions, more than the 4 ggml supports", "reshape the tensor to 4 dimensions or fewer");
      std::int64_t ne[gguf_max_dims] = {1, 1, 1, 1};
      for (std::uint64_t d = 0; d < n_dims; ++d) {
        const std::uint64_t at = pos_;
        ne[d] = static_cast<std::int64_t>(read_u(8, "tensor info", info.name, "a dimension"));
        if (ne[d] < 0)
          fail("tensor info", info.name, at, "dimension " + std::to_string(d) + " is negative (" + std::to_string(ne[d]) + ")",
               "the tensor info is corrupt: convert the file again");
        info.dims.push_back(ne[d]);
      }
      const bool empty = ne[0] == 0 || ne[1] == 0 || ne[2] == 0 || ne[3] == 0;
      // gguf.cpp's own test, kept exactly: the element count must stay below INT64_MAX.
      if (!empty && (INT64_MAX / ne[1] <= ne[0] || INT64_MAX / ne[2] <= ne[0] * ne[1] ||
                     INT64_MAX / ne[3] <= ne[0] * ne[1] * ne[2]))
        fail("tensor info", info.name, dims_at, "the element count of dimensions " + dims_string(info.dims) + " overflows int64",
             "the tensor info is corrupt: convert the file again");
      // With a zero dimension the others may be huge: their product is never formed.
      info.numel = empty ? 0 : ne[0] * ne[1] * ne[2] * ne[3];

      const std::uint64_t type_at = pos_;
      const std::uint64_t type_id = read_u(4, "tensor info", info.name, "the tensor type");
      const ggml_type_traits* traits = type_id <= UINT32_MAX ? ggml_traits(static_cast<std::uint32_t>(type_id)) : nullptr;
      if (traits == nullptr)
        fail("tensor info", info.name, type_at,
             "ggml type id " + std::to_string(type_id) + " is unknown (known ids are 0.." + std::to_string(ggml_type_count - 1) + ")",
             "the file was written by a newer ggml or is corrupt: update distorch or convert the file again");
      if (traits->removed)
        fail("tensor info", info.name, type_at,
             "ggml type " + std::string(traits->name) + " (id " + std::to_string(type_id) + ") was removed from GGUF files",
             "requantize the model with a current llama.cpp (Q4_0_x_y and IQ4_NL_x_y are repacked at load time now)");
      info.type = static_cast<ggml_type>(type_id);
      if (ne[0] % traits->block_elements != 0)
        fail("tensor info", info.name, type_at,
             "row length " + std::to_string(ne[0]) + " is not a multiple of the " + std::string(traits->name) +
                 " block size " + std::to_string(traits->block_elements),
             "the tensor info is corrupt: convert the file again");
      const std::uint64_t blocks = static_cast<std::uint64_t>(info.numel) / traits->block_elements;
      if (blocks > UINT64_MAX / traits->block_bytes)
        fail("tensor info", info.name, type_at, "the byte size of dimensions " + dims_string(info.dims) + " overflows",
             "the tensor info is corrupt: convert the file again");
      info.bytes = blocks * traits->block_bytes;

      info.offset = read_u(8, "tensor info", info.name, "the data offset");
      info.shape.assign(info.dims.rbegin(), info.dims.rend());
      out.tensor_index.emplace(info.name, out.tensors.size());
      out.tensors.push_back(std::move(info));
    }
  }

  void place_data(gguf_file& out) {
    const std::string subject{label_};
    std::uint64_t start = pos_;
    if (!out.tensors.empty()) {
      // The data section starts at the next multiple of the alignment.
      const std::uint64_t rem = start % out.alignment;
      if (rem != 0) {
        const std::uint64_t pad = out.alignment - rem;
        if (pad > remaining())
          fail("data section", subject, start,
               "the data section would start at byte " + std::to_string(start) + " + " + std::to_string(pad) +
                   " bytes of padding, past the end of the " + std::to_string(bytes_.size()) + "-byte file",
               "the file is truncated: download or convert it again");
        start += pad;
      }
    }
    out.data_offset = start;
    std::uint64_t size = 0;
    for (auto& t : out.tensors) {
      if (t.offset != size)
        fail("tensor info", t.name, start + size,
             "data offset " + std::to_string(t.offset) + " is not where the previous tensor's padded data ends (" +
                 std::to_string(size) + ")",
             "GGUF tensors are stored in info order, each aligned: convert the file again");
      const std::uint64_t padded_bytes = pad_up(t.bytes, out.alignment);
      if (padded_bytes < t.bytes || UINT64_MAX - size < padded_bytes)
        fail("tensor info", t.name, start, "the data section size overflows", "the tensor info is corrupt: convert the file again");
      t.file_offset = start + t.offset;
      if (t.file_offset < start || t.file_offset > bytes_.size() || t.bytes > bytes_.size() - t.file_offset)
        fail("tensor info", t.name, start + t.offset,
             "its " + std::to_string(t.bytes) + " bytes at data offset " + std::to_string(t.offset) +
                 " run past the end of the " + std::to_string(bytes_.size()) + "-byte file",
             "the file is truncated: download or convert it again");
      size += padded_bytes;
    }
    out.data_size = size;
  }

  static std::uint64_t pad_up(std::uint64_t n, std::uint64_t alignment) noexcept {
    const std::uint64_t rem = n % alignment;
    return rem == 0 ? n : n + (alignment - rem);  // wraps on overflow; the caller checks
  }

  // ComfyUI-GGUF stores the shape a tensor had before it was flattened for quantization as an
  // integer array `comfy.gguf.orig_shape.<name>`; that is the shape the model expects.
  void apply_orig_shapes(gguf_file& out) {
    constexpr std::string_view prefix = "comfy.gguf.orig_shape.";
    for (const auto& kv : out.metadata) {
      if (!kv.key.starts_with(prefix)) continue;
      const std::string name = kv.key.substr(prefix.size());
      const auto it = out.tensor_index.find(name);
      if (it == out.tensor_index.end()) continue;  // names no tensor of this file: nothing to reshape
      auto& t = out.tensors[it->second];
      if (!kv.value.is_array || !kv.value.is_integer())
        fail("metadata", kv.key, pos_, "the original shape must be an integer array", "write it as an array of int32");
      std::vector<std::int64_t> shape;
      std::int64_t numel = 1;
      bool overflow = false;
      for (std::size_t i = 0; i < kv.value.size(); ++i) {
        const auto d = kv.value.get_int(i);
        if (!d || *d < 0)
          fail("metadata", kv.key, pos_, "dimension " + std::to_string(i) + " of the original shape is negative or too large",
               "write non-negative dimensions");
        overflow = overflow || __builtin_mul_overflow(numel, *d, &numel);
        shape.push_back(*d);
      }
      if (overflow || numel != t.numel)
        fail("metadata", kv.key, pos_,
             "the original shape " + dims_string(shape) + " does not hold the tensor's " + std::to_string(t.numel) + " elements",
             "write the shape the tensor had before it was reshaped, or drop the key");
      t.shape = std::move(shape);
    }
  }

  static std::string dims_string(const std::vector<std::int64_t>& dims) {
    std::string s = "[";
    for (std::size_t i = 0; i < dims.size(); ++i) {
      if (i != 0) s += ", ";
      s += std::to_string(dims[i]);
    }
    return s + ']';
  }

  std::span<const std::byte> bytes_;
  std::string_view label_;
  std::uint64_t pos_ = 0;
};

}  // namespace detail

/// Parses the header, metadata and tensor infos of a GGUF file held whole in `bytes` (typically a
/// `mapped_file`). `label` (the path) names the file in errors. Throws `format_error` naming the
/// key, tensor or file and the byte offset for every malformed or unsupported input.
/// \code
///   auto gguf = distorch::parse_gguf(file->bytes(), file->path());
///   gguf.alignment;       // 32 unless general.alignment says otherwise
///   gguf.tensors[0].shape;   // PyTorch order
/// \endcode
inline gguf_file parse_gguf(std::span<const std::byte> bytes, std::string_view label = {}) {
  return detail::gguf_parser(bytes, label).parse();
}

/// The bytes of one tensor inside the file it was parsed from. Throws `format_error` when `bytes`
/// is not that file (too short for the tensor).
/// \code auto data = distorch::gguf_tensor_bytes(file->bytes(), *gguf.find_tensor("output.weight")); \endcode
inline std::span<const std::byte> gguf_tensor_bytes(std::span<const std::byte> bytes, const gguf_tensor_info& t) {
  if (t.file_offset > bytes.size() || t.bytes > bytes.size() - t.file_offset)
    throw format_error({"reading GGUF tensor data", t.name, error_position{"offset", t.file_offset},
                        "the tensor's bytes lie past the end of the given buffer",
                        "pass the bytes of the file the tensor info was parsed from"});
  return bytes.subspan(static_cast<std::size_t>(t.file_offset), static_cast<std::size_t>(t.bytes));
}

/// Inventory records of every tensor, in file order: plain ggml types (F32, F16, BF16, F64,
/// I8..I64) as their dtype, block-quantized ones as `dtype::opaque` with their exact byte size.
/// Shapes are PyTorch order.
/// \code
///   auto inv = distorch::inventory::from_records(distorch::gguf_records(gguf), {{R"(blk\.\d+)"}});
/// \endcode
inline std::vector<tensor_record> gguf_records(const gguf_file& file) {
  std::vector<tensor_record> records;
  records.reserve(file.tensors.size());
  for (const auto& t : file.tensors) {
    tensor_record r;
    r.name = t.name;
    r.shape = t.shape;
    if (const auto plain = ggml_plain_dtype(t.type)) {
      r.type = *plain;
    } else {
      r.type = dtype::opaque;
      r.bytes = t.bytes;
    }
    records.push_back(std::move(r));
  }
  return records;
}

}  // namespace distorch::inline v0
