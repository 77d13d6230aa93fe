#pragma once
/// \file
/// The allocation grammar, compatible with DisTorch2's strings. Pure C++20: no LibTorch.
///
/// ```
/// spec     = part (';' part)*
/// part     = entry | override
/// entry    = device ',' value [':' storage]    bytes, ratio or fraction mode
/// override = regex '=' device                  pins matching units (llama.cpp -ot style)
/// vvram    = device ';' gigabytes ';' donor (',' donor)*     virtual VRAM (compute;GB;donors)
/// donor    = device [':' storage]
/// storage  = fp8 | e4m3 | e5m2 | bf16 | fp16 (and the PyTorch names, see storage_dtype_names)
/// auto     = 'auto'
/// ```
///
/// - bytes mode: `2.5gb`, `500mb`, `3.0g`, `1024k`, `4096b`; `*` marks the wildcard (`cpu,*`,
///   `cpu,5gb*`); without a wildcard `cpu` takes the remainder.
/// - ratio mode: every value ends in `%`; the values are parts of a ratio (`8%;8%;4%` = 40/40/20).
/// - fraction mode: plain numbers in [0,1], each a fraction of that device's total memory.
/// - a storage suffix (`cpu,*:fp8`, `cuda:1,4gb:bf16`, `cuda:0;4;cpu:e5m2`) stores that device's
///   floating weights in a narrower dtype; `storage_of` lists them (the runtime casts them back
///   after each fetch). A string without suffixes parses exactly as before.
///
/// Parsing checks everything that needs no topology; `check_against` adds the checks that do.
/// Every problem is an `allocation_error` naming the entry and its 1-based column.
///
/// Example:
/// \code
///   auto spec = distorch::parse_allocation("cuda:0,500mb;cuda:1,3.0g;cpu,5gb*");
///   spec.mode == distorch::allocation_mode::bytes;
///   spec.entries[2].wildcard;                          // true
///   spec.entries[1].bytes == 3ull << 30;               // true
/// \endcode

#include <cstddef>
#include <cstdint>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/core/user_regex.hpp"
#include "distorch/core/log.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/model/dtype.hpp"

namespace distorch::inline v0 {

/// How an allocation string splits the model.
enum class allocation_mode : std::uint8_t {
  bytes,         ///< `cuda:0,2.5gb;cpu,*`
  ratio,         ///< `cuda:0,25%;cpu,75%`
  fraction,      ///< `cuda:0,0.1;cpu,0.5`
  virtual_vram,  ///< `cuda:0;4;cpu`
  automatic,     ///< `auto`
};

/// "bytes", "ratio", "fraction", "virtual VRAM", "auto".
/// \code
///   std::cout << distorch::mode_name(distorch::parse_allocation("cpu,*").mode);   // bytes
/// \endcode
constexpr std::string_view mode_name(allocation_mode m) noexcept {
  switch (m) {
    case allocation_mode::bytes: return "bytes";
    case allocation_mode::ratio: return "ratio";
    case allocation_mode::fraction: return "fraction";
    case allocation_mode::virtual_vram: return "virtual VRAM";
    case allocation_mode::automatic: return "auto";
  }
  return "?";
}

/// Ratio and fraction values are kept as exact fixed-point numbers with nine decimals, so that
/// quotas are integer arithmetic and the same string always gives the same bytes.
inline constexpr std::uint64_t decimal_one = 1'000'000'000ull;

/// One `device,value` entry (or one donor of the virtual-VRAM form).
struct allocation_entry {
  device_id device;
  std::string text;            ///< the entry as written, without surrounding spaces
  std::size_t column = 0;      ///< 1-based column of the entry; 0 when not from a string
  std::size_t value_column = 0;
  std::uint64_t bytes = 0;     ///< bytes mode: the size (0 for a bare `*`)
  bool wildcard = false;       ///< bytes mode: `*` or `N*`
  bool has_size = false;       ///< bytes mode: a size was written (false for a bare `*`)
  std::uint64_t value_e9 = 0;  ///< ratio and fraction modes: value × 1e9
  /// The `:dtype` suffix: the narrower dtype this device stores floating weights in, if written.
  std::optional<dtype> storage;
  std::size_t storage_column = 0;  ///< 1-based column of the suffix's name; 0 when none
  friend bool operator==(const allocation_entry&, const allocation_entry&) = default;
};

/// One `regex=device` override.
struct override_rule {
  std::string pattern;  ///< ECMAScript regex, searched in unit names (as llama.cpp's -ot)
  device_id device;
  std::string text;        ///< the override as written
  std::size_t column = 0;  ///< 1-based; 0 when not from a string
  friend bool operator==(const override_rule&, const override_rule&) = default;
};

/// A parsed allocation string.
struct allocation_spec {
  std::string text;  ///< the string as given
  allocation_mode mode = allocation_mode::bytes;
  /// bytes / ratio / fraction: the entries in written order. virtual VRAM: the donors in order.
  std::vector<allocation_entry> entries;
  device_id vvram_compute;               ///< virtual VRAM: the compute device
  std::size_t vvram_compute_column = 0;  ///< virtual VRAM: its column
  std::uint64_t vvram_bytes = 0;         ///< virtual VRAM: bytes to move off the compute device
  std::size_t vvram_bytes_column = 0;
  std::vector<override_rule> overrides;  ///< in written order; the first match wins

  /// The entry of a device, or nullptr.
  const allocation_entry* find(const device_id& d) const noexcept {
    for (const auto& e : entries)
      if (e.device == d) return &e;
    return nullptr;
  }
  friend bool operator==(const allocation_spec&, const allocation_spec&) = default;
};

/// The names a storage suffix accepts (case-insensitive) and the dtypes they mean.
/// \code
///   for (const auto& [name, type] : distorch::storage_dtype_names) std::cout << name << ' ' << distorch::dtype_name(type) << '\n';
/// \endcode
inline constexpr std::pair<std::string_view, dtype> storage_dtype_names[] = {
    {"fp8", dtype::f8_e4m3},  {"e4m3", dtype::f8_e4m3},     {"float8_e4m3fn", dtype::f8_e4m3}, {"e5m2", dtype::f8_e5m2},
    {"float8_e5m2", dtype::f8_e5m2}, {"bf16", dtype::bf16}, {"bfloat16", dtype::bf16},        {"fp16", dtype::f16},
    {"f16", dtype::f16},      {"float16", dtype::f16},      {"half", dtype::f16},
};

namespace detail {

inline constexpr std::string_view allocation_forms =
    "write device,value entries separated by ';' (cuda:0,2.5gb;cpu,* or cuda:0,25%;cpu,75% or cuda:0,0.1;cpu,0.5), "
    "compute;gigabytes;donors (cuda:0;4;cpu) or auto";

[[noreturn]] inline void allocation_fail(std::string_view doing, std::string_view subject, std::size_t column,
                                         std::string problem, std::string fix) {
  throw allocation_error({std::string(doing), std::string(subject),
                          column == 0 ? std::nullopt : std::optional<error_position>(error_position{"column", column}),
                          std::move(problem), std::move(fix)});
}

inline constexpr std::string_view parsing_doing = "parsing allocation string";

inline constexpr std::string_view storage_names_text =
    "fp8 (= e4m3, float8_e4m3fn), e5m2 (= float8_e5m2), bf16 (= bfloat16), fp16 (= f16, float16, half)";

/// A piece of the input with its 0-based offset, spaces trimmed.
struct piece {
  std::string_view text;
  std::size_t offset = 0;
};

inline piece trim_piece(std::string_view text, std::size_t offset) noexcept {
  std::size_t b = 0, e = text.size();
  while (b < e && (text[b] == ' ' || text[b] == '\t')) ++b;
  while (e > b && (text[e - 1] == ' ' || text[e - 1] == '\t')) --e;
  return {text.substr(b, e - b), offset + b};
}

/// Splits on `sep` and trims each piece; offsets point into the original text.
inline std::vector<piece> split_pieces(std::string_view text, char sep, std::size_t offset) {
  std::vector<piece> out;
  std::size_t start = 0;
  while (true) {
    const std::size_t at = text.find(sep, start);
    const std::size_t end = at == std::string_view::npos ? text.size() : at;
    out.push_back(trim_piece(text.substr(start, end - start), offset + start));
    if (at == std::string_view::npos) break;
    start = at + 1;
  }
  return out;
}

inline bool is_non_finite_word(std::string_view v) noexcept {
  if (!v.empty() && (v.front() == '-' || v.front() == '+')) v.remove_prefix(1);
  return iequals(v, "nan") || iequals(v, "inf") || iequals(v, "infinity");
}

/// Result of parsing a plain decimal such as `0.25` or `8` into value × 1e9.
struct decimal_result {
  std::uint64_t value_e9 = 0;
  std::string problem;
  std::size_t index = 0;  ///< 0-based, into the parsed text
  std::string fix;
  bool ok() const noexcept { return problem.empty(); }
};

/// Parses an unsigned plain decimal. Digits beyond the ninth decimal are dropped: they cannot
/// change a byte count of any real device.
inline decimal_result parse_decimal(std::string_view text) {
  decimal_result r;
  auto fail = [&](std::size_t index, std::string problem, std::string fix) {
    r.problem = std::move(problem);
    r.index = index;
    r.fix = std::move(fix);
    return r;
  };
  if (text.empty()) return fail(0, "empty value", "write a number such as 0.5");
  if (is_non_finite_word(text)) return fail(0, "'" + std::string(text) + "' is not a finite number", "write a number such as 0.5");
  std::size_t i = 0;
  if (text[0] == '-') return fail(0, "negative value", "values cannot be negative");
  if (text[0] == '+') ++i;
  std::uint64_t integer = 0;
  std::size_t digits = 0;
  for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i, ++digits) {
    integer = integer * 10 + static_cast<std::uint64_t>(text[i] - '0');
    if (integer > 1'000'000'000ull) return fail(0, "value '" + std::string(text) + "' is too large", "write a number below 1e9");
  }
  std::uint64_t fraction = 0;
  std::size_t fraction_digits = 0;
  if (i < text.size() && text[i] == '.') {
    ++i;
    for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i, ++digits) {
      if (fraction_digits < 9) fraction = fraction * 10 + static_cast<std::uint64_t>(text[i] - '0'), ++fraction_digits;
    }
  }
  if (digits == 0) return fail(i, "'" + std::string(text) + "' is not a number", "write a number such as 0.5");
  if (i < text.size()) {
    if (text[i] == 'e' || text[i] == 'E') return fail(i, "exponent notation is not accepted", "write the number in plain decimals, e.g. 0.001");
    return fail(i, "unexpected '" + std::string(text.substr(i)) + "' after the number", "write a number such as 0.5");
  }
  for (std::size_t k = fraction_digits; k < 9; ++k) fraction *= 10;
  r.value_e9 = integer * decimal_one + fraction;
  return r;
}

inline bool has_letter(std::string_view v) noexcept {
  for (char c : v)
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return true;
  return false;
}

/// Checks an override pattern with the shared user-regex rules (core/user_regex.hpp).
inline void check_override_pattern(const piece& pattern, std::string_view entry, std::size_t entry_column) {
  constexpr std::string_view doing = "parsing allocation override";
  if (pattern.text.empty())
    allocation_fail(doing, entry, entry_column, "empty regex before '='", "write regex=device, e.g. blocks\\.(0|1)\\..*=cuda:1");
  if (auto p = check_user_regex(pattern.text))
    allocation_fail(doing, entry, pattern.offset + p->index + 1, "override " + p->problem, p->fix);
}

/// Parses a storage suffix (the text after ':'); `colon` is the 0-based offset of the ':'.
inline dtype parse_storage_suffix(const piece& suffix, std::size_t colon, std::string_view entry) {
  if (suffix.text.empty())
    allocation_fail(parsing_doing, entry, colon + 2, "missing storage dtype after ':'",
                    "write one of " + std::string(storage_names_text) + ", e.g. cpu,*:fp8, or drop the ':'");
  if (const auto second = suffix.text.find(':'); second != std::string_view::npos)
    allocation_fail(parsing_doing, entry, suffix.offset + second + 1, "more than one storage suffix ('" + std::string(suffix.text) + "')",
                    "give each device one storage dtype, e.g. cpu,*:fp8");
  for (const auto& [name, type] : storage_dtype_names)
    if (iequals(suffix.text, name)) return type;
  allocation_fail(parsing_doing, entry, suffix.offset + 1, "unknown storage dtype '" + std::string(suffix.text) + "'",
                  "write one of " + std::string(storage_names_text));
}

inline bool is_storage_name(std::string_view text) noexcept {
  for (const auto& [name, type] : storage_dtype_names)
    if (iequals(text, name)) return true;
  return false;
}

/// A device name with an optional storage suffix (`cpu:fp8`, `cuda:1:bf16`).
struct device_and_storage {
  piece device;
  std::optional<piece> suffix;
  std::size_t colon = 0;  ///< 0-based offset of the suffix's ':'
};

/// Splits off the text after the last ':' as a storage suffix when it is a storage name, or, with
/// `any_word`, when it is any word after a valid device (`cpu:nf4`: a device index is digits).
/// Otherwise the whole text is the device, so a bad device keeps its own error.
inline device_and_storage split_device_storage(const piece& text, bool any_word) {
  const auto colon = text.text.rfind(':');
  if (colon == std::string_view::npos || colon + 1 >= text.text.size()) return {text, std::nullopt, 0};
  const auto device = trim_piece(text.text.substr(0, colon), text.offset);
  const auto suffix = trim_piece(text.text.substr(colon + 1), text.offset + colon + 1);
  const char next = text.text[colon + 1];
  const bool word = (next >= 'a' && next <= 'z') || (next >= 'A' && next <= 'Z');
  const bool known = is_storage_name(suffix.text);
  if (!known && !(any_word && word && device_id::try_parse(device.text).ok())) return {text, std::nullopt, 0};
  return {device, suffix, text.offset + colon};
}

inline device_id parse_entry_device(const piece& name, std::string_view entry) {
  if (name.text.empty())
    allocation_fail(parsing_doing, entry, name.offset + 1, "missing device name", "write e.g. cuda:0 or cpu before the ','");
  auto id = device_id::try_parse(name.text);
  if (!id.ok()) allocation_fail(parsing_doing, entry, name.offset + id.index + 1, id.problem, id.fix);
  return *id.id;
}

/// Parses the value of a `device,value` entry and reports its mode.
inline allocation_mode parse_entry_value(const piece& value, allocation_entry& out, std::string_view entry) {
  const std::string_view v = value.text;
  const std::size_t col = value.offset + 1;
  if (v.empty()) allocation_fail(parsing_doing, entry, col, "missing value after ','", "write a size (2.5gb), a ratio (25%) or a fraction (0.5)");
  if (is_non_finite_word(v) || is_non_finite_word(std::string_view(v).substr(0, v.size() - (v.back() == '%' || v.back() == '*'))))
    allocation_fail(parsing_doing, entry, col, "'" + std::string(v) + "' is not a finite number", "write a finite value such as 2.5gb, 25% or 0.5");
  if (v.front() == '-') allocation_fail(parsing_doing, entry, col, "negative value '" + std::string(v) + "'", "values cannot be negative");
  if (v.back() == '%') {
    auto number = trim_piece(v.substr(0, v.size() - 1), value.offset);
    auto d = parse_decimal(number.text);
    if (!d.ok()) allocation_fail(parsing_doing, entry, number.offset + d.index + 1, "ratio " + d.problem, d.fix.empty() ? "write a ratio part such as 25%" : d.fix);
    out.value_e9 = d.value_e9;
    return allocation_mode::ratio;
  }
  if (const auto star = v.find('*'); star != std::string_view::npos) {
    if (star + 1 != v.size())
      allocation_fail(parsing_doing, entry, value.offset + star + 1, "'*' must end the value", "write * or a size followed by *, e.g. 5gb*");
    out.wildcard = true;
    const auto size = trim_piece(v.substr(0, star), value.offset);
    if (!size.text.empty()) {
      auto b = try_parse_bytes(size.text);
      if (!b.ok()) allocation_fail(parsing_doing, entry, size.offset + b.index + 1, b.problem, b.fix);
      out.bytes = b.value;
      out.has_size = true;
    }
    return allocation_mode::bytes;
  }
  if (has_letter(v)) {
    auto b = try_parse_bytes(v);
    if (!b.ok()) allocation_fail(parsing_doing, entry, value.offset + b.index + 1, b.problem, b.fix);
    out.bytes = b.value;
    out.has_size = true;
    return allocation_mode::bytes;
  }
  auto d = parse_decimal(v);
  if (!d.ok()) allocation_fail(parsing_doing, entry, value.offset + d.index + 1, d.problem, d.fix);
  if (d.value_e9 > decimal_one)
    allocation_fail(parsing_doing, entry, col, "fraction " + std::string(v) + " is greater than 1",
                    "a plain number is a fraction of the device's total memory in [0,1]; for bytes write a unit, e.g. " +
                        std::string(v) + "gb");
  out.value_e9 = d.value_e9;
  return allocation_mode::fraction;
}

inline void reject_duplicate(const std::vector<allocation_entry>& seen, const allocation_entry& e, std::string_view doing) {
  for (const auto& s : seen)
    if (s.device == e.device)
      allocation_fail(doing, e.text, e.column,
                      "device " + e.device.str() + " is named twice (first at column " + std::to_string(s.column) + ")",
                      "name each device once");
}

}  // namespace detail

/// Parses an allocation string. Throws `allocation_error` naming the entry and its 1-based
/// column for every invalid form: mixed modes, unknown device types, a device named twice,
/// negative / NaN / unparsable values, a fraction above 1, ratios summing to zero, two
/// wildcards, empty entries, and bad override regexes.
/// \code
///   auto spec = distorch::parse_allocation("blocks\\.0\\..*=cuda:1;cuda:0,25%;cpu,75%");
///   spec.mode == distorch::allocation_mode::ratio;   spec.overrides.size() == 1;
/// \endcode
inline allocation_spec parse_allocation(std::string_view text) {
  using namespace detail;
  allocation_spec spec;
  spec.text = std::string(text);
  if (trim_piece(text, 0).text.empty())
    allocation_fail(parsing_doing, text, 1, "empty allocation string", std::string(allocation_forms));

  // Overrides first: they may appear anywhere and in every form.
  std::vector<piece> parts;
  for (const auto& p : split_pieces(text, ';', 0)) {
    if (p.text.empty())
      allocation_fail(parsing_doing, text, p.offset + 1, "empty entry", "remove the extra ';' or write device,value there");
    const auto eq = p.text.rfind('=');
    if (eq == std::string_view::npos) {
      parts.push_back(p);
      continue;
    }
    const auto pattern = trim_piece(p.text.substr(0, eq), p.offset);
    const auto device = trim_piece(p.text.substr(eq + 1), p.offset + eq + 1);
    check_override_pattern(pattern, p.text, p.offset + 1);
    if (device.text.empty())
      allocation_fail("parsing allocation override", p.text, device.offset + 1, "missing device after '='", "write regex=device, e.g. blocks\\.0\\..*=cuda:1");
    if (const auto split = split_device_storage(device, false); split.suffix)
      allocation_fail("parsing allocation override", p.text, split.suffix->offset + 1,
                      "an override takes no storage suffix ('" + std::string(split.suffix->text) + "')",
                      "put the suffix on the device's entry, e.g. " + std::string(split.device.text) + ",*:" + std::string(split.suffix->text));
    auto id = device_id::try_parse(device.text);
    if (!id.ok()) allocation_fail("parsing allocation override", p.text, device.offset + id.index + 1, id.problem, id.fix);
    spec.overrides.push_back({std::string(pattern.text), *id.id, std::string(p.text), p.offset + 1});
  }
  if (parts.empty())
    allocation_fail(parsing_doing, text, 1, "only overrides, no device entries",
                    "add the policy for the other units, e.g. ;cuda:0,2.5gb;cpu,*");

  // auto
  if (parts.size() == 1 && iequals(parts[0].text, "auto")) {
    spec.mode = allocation_mode::automatic;
    return spec;
  }
  for (const auto& p : parts)
    if (iequals(p.text, "auto"))
      allocation_fail(parsing_doing, p.text, p.offset + 1, "'auto' mixed with other entries", "write auto alone (overrides may accompany it)");

  // virtual VRAM: compute;gigabytes;donor[,donor...]
  if (parts[0].text.find(',') == std::string_view::npos) {
    if (parts.size() != 3 || parts[1].text.find(',') != std::string_view::npos)
      allocation_fail(parsing_doing, parts[0].text, parts[0].offset + 1, "missing ',value' after the device",
                      std::string(allocation_forms));
    spec.mode = allocation_mode::virtual_vram;
    constexpr std::string_view doing = "parsing virtual VRAM allocation";
    if (const auto split = split_device_storage(parts[0], false); split.suffix)
      allocation_fail(doing, parts[0].text, split.suffix->offset + 1,
                      "the compute device takes no storage suffix ('" + std::string(split.suffix->text) + "')",
                      "units on the compute device keep the module's dtype; put the suffix on a donor, e.g. " +
                          std::string(split.device.text) + ";4;cpu:" + std::string(split.suffix->text));
    spec.vvram_compute = parse_entry_device(parts[0], parts[0].text);
    spec.vvram_compute_column = parts[0].offset + 1;
    const auto& amount = parts[1];
    spec.vvram_bytes_column = amount.offset + 1;
    if (has_letter(amount.text) && !is_non_finite_word(amount.text)) {
      auto b = try_parse_bytes(amount.text);
      if (!b.ok()) allocation_fail(doing, amount.text, amount.offset + b.index + 1, b.problem, b.fix);
      spec.vvram_bytes = b.value;
    } else {
      auto d = parse_decimal(amount.text);
      if (!d.ok())
        allocation_fail(doing, amount.text, amount.offset + d.index + 1, "gigabytes: " + d.problem,
                        "write how many GB to move off the compute device, e.g. cuda:0;4;cpu");
      // GB here are binary, as everywhere in distorch: value_e9 × 2^30 / 1e9.
      spec.vvram_bytes = static_cast<std::uint64_t>(static_cast<unsigned __int128>(d.value_e9) * (1ull << 30) / decimal_one);
    }
    allocation_entry compute_entry;
    compute_entry.device = spec.vvram_compute;
    compute_entry.text = std::string(parts[0].text);
    compute_entry.column = parts[0].offset + 1;
    std::vector<allocation_entry> seen{compute_entry};
    for (const auto& donor : split_pieces(parts[2].text, ',', parts[2].offset)) {
      if (donor.text.empty())
        allocation_fail(doing, parts[2].text, donor.offset + 1, "empty donor", "list donors separated by ',', e.g. cuda:1,cpu");
      allocation_entry e;
      const auto split = split_device_storage(donor, true);
      if (split.suffix)
        if (const auto inner = split_device_storage(split.device, true); inner.suffix)
          allocation_fail(doing, donor.text, inner.suffix->offset + 1, "more than one storage suffix ('" + std::string(donor.text) + "')",
                          "give each donor one storage dtype, e.g. cpu:fp8");
      e.device = parse_entry_device(split.device, donor.text);
      if (split.suffix) {
        e.storage = parse_storage_suffix(*split.suffix, split.colon, donor.text);
        e.storage_column = split.suffix->offset + 1;
      }
      e.text = std::string(donor.text);
      e.column = e.value_column = donor.offset + 1;
      if (e.device == spec.vvram_compute)
        allocation_fail(doing, e.text, e.column, "the compute device " + e.device.str() + " cannot donate to itself",
                        "list other devices as donors, e.g. cpu");
      reject_duplicate(seen, e, doing);
      seen.push_back(e);
      spec.entries.push_back(std::move(e));
    }
    return spec;
  }

  // device,value entries
  std::optional<allocation_mode> mode;
  std::optional<std::size_t> wildcard;  // index of the wildcard entry
  spec.entries.reserve(parts.size());
  for (const auto& p : parts) {
    const auto comma = p.text.find(',');
    if (comma == std::string_view::npos)
      allocation_fail(parsing_doing, p.text, p.offset + 1, "missing ',value' after the device", std::string(allocation_forms));
    allocation_entry e;
    e.text = std::string(p.text);
    e.column = p.offset + 1;
    const auto name = trim_piece(p.text.substr(0, comma), p.offset);
    auto value = trim_piece(p.text.substr(comma + 1), p.offset + comma + 1);
    e.value_column = value.offset + 1;
    if (const auto split = split_device_storage(name, false); split.suffix)
      allocation_fail(parsing_doing, p.text, split.suffix->offset + 1,
                      "the storage suffix ':" + std::string(split.suffix->text) + "' must follow the value",
                      "write device,value:dtype, e.g. " + std::string(split.device.text) + ",*:" + std::string(split.suffix->text));
    e.device = parse_entry_device(name, p.text);
    if (value.text.find(',') != std::string_view::npos)
      allocation_fail(parsing_doing, p.text, value.offset + value.text.find(',') + 1, "more than one ',' in an entry",
                      "separate entries with ';', e.g. cuda:0,2gb;cpu,*");
    std::optional<piece> suffix;  // value ':' storage
    std::size_t colon = 0;
    if (const auto at = value.text.find(':'); at != std::string_view::npos) {
      suffix = trim_piece(value.text.substr(at + 1), value.offset + at + 1);
      colon = value.offset + at;
      value = trim_piece(value.text.substr(0, at), value.offset);
    }
    const auto m = parse_entry_value(value, e, p.text);
    if (suffix) {
      e.storage = parse_storage_suffix(*suffix, colon, p.text);
      e.storage_column = suffix->offset + 1;
    }
    if (!mode) {
      mode = m;
    } else if (*mode != m) {
      const auto& first = spec.entries.front();
      allocation_fail(parsing_doing, p.text, e.value_column,
                      "mixes " + std::string(mode_name(m)) + " with " + std::string(mode_name(*mode)) + " (set by '" +
                          first.text + "' at column " + std::to_string(first.column) + ")",
                      "use one mode for every entry: all sizes (2gb, *), all ratios (25%) or all fractions (0.25)");
    }
    reject_duplicate(spec.entries, e, parsing_doing);
    if (e.wildcard) {
      if (wildcard) {
        const auto& w = spec.entries[*wildcard];
        allocation_fail(parsing_doing, p.text, e.value_column,
                        "second wildcard (the first is '" + w.text + "' at column " + std::to_string(w.column) + ")",
                        "mark one device with *, the one that takes the remainder");
      }
      wildcard = spec.entries.size();
    }
    spec.entries.push_back(std::move(e));
  }
  spec.mode = *mode;
  if (spec.mode == allocation_mode::ratio) {
    unsigned __int128 sum = 0;
    for (const auto& e : spec.entries) sum += e.value_e9;
    if (sum == 0)
      allocation_fail(parsing_doing, spec.entries.front().text, spec.entries.front().value_column, "ratios sum to zero",
                      "give at least one device a positive part, e.g. cuda:0,25%;cpu,75%");
  }
  return spec;
}

/// A device's storage dtype from an allocation string's `:dtype` suffix (`cpu,*:fp8`).
/// \code distorch::device_storage s{distorch::device_id::cpu(), distorch::dtype::f8_e4m3}; \endcode
struct device_storage {
  device_id device;
  dtype type = dtype::f32;
  friend bool operator==(const device_storage&, const device_storage&) = default;
};

/// The storage suffixes of a parsed allocation, one per device that has one, in written order.
/// The runtime takes them as `distribute_spec::storage.homes` (DistributedModule merges them in
/// by itself when its policy was made from the string).
/// \code
///   auto homes = distorch::storage_of(distorch::parse_allocation("cuda:0,2gb;cuda:1,4gb:bf16;cpu,*:fp8"));
///   // {{cuda:1, bf16}, {cpu, f8_e4m3}}
/// \endcode
inline std::vector<device_storage> storage_of(const allocation_spec& spec) {
  std::vector<device_storage> out;
  for (const auto& e : spec.entries)
    if (e.storage) out.push_back({e.device, *e.storage});
  return out;
}

/// Checks a parsed spec against a topology: every device named (entries, virtual-VRAM compute
/// and donors, override targets) must be present. Byte requests larger than a device's free
/// memory are an `allocation_error` when `strict`, and a warning otherwise (returned and sent to
/// the log sink). Quotas that depend on the model are checked by the policies at plan time.
/// \code
///   auto spec = distorch::parse_allocation("cuda:0,30gb;cpu,*");
///   auto topo = distorch::parse_topology("cuda:0=24GiB,cpu=64GiB");
///   auto warnings = distorch::check_against(spec, topo);   // one warning: asks 30 GiB of 24
/// \endcode
inline std::vector<std::string> check_against(const allocation_spec& spec, const topology& topo, bool strict = false) {
  constexpr std::string_view doing = "checking allocation against devices";
  std::vector<std::string> warnings;
  auto require = [&](const device_id& d, std::string_view entry, std::size_t column) -> const device_info& {
    const auto* info = topo.find(d);
    if (!info)
      detail::allocation_fail(doing, entry, column, "device " + d.str() + " is not present (devices: " + topo.str() + ")",
                              "name only devices of the topology, or add " + d.str() + " to it");
    return *info;
  };
  if (spec.mode == allocation_mode::virtual_vram) require(spec.vvram_compute, spec.text, spec.vvram_compute_column);
  for (const auto& e : spec.entries) {
    const auto& info = require(e.device, e.text, e.column);
    if (spec.mode == allocation_mode::bytes && !e.wildcard && e.bytes > info.free_bytes) {
      std::string problem = "asks " + format_bytes(e.bytes) + " but " + e.device.str() + " has " + format_bytes(info.free_bytes) + " free";
      if (strict) detail::allocation_fail(doing, e.text, e.value_column, problem, "ask at most " + format_bytes(info.free_bytes) + ", or leave strict mode to clamp");
      warnings.push_back("'" + e.text + "' at column " + std::to_string(e.column) + " " + problem + "; clamped to " + format_bytes(info.free_bytes));
    }
  }
  for (const auto& o : spec.overrides) require(o.device, o.text, o.column);
  for (const auto& w : warnings) log(log_level::warning, w);
  return warnings;
}

}  // namespace distorch::inline v0
