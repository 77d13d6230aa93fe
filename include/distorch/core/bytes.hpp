#pragma once
/// \file
/// Byte quantities: "2.5gb", "500mb", "3.0g", "1024k", "4096b", "1.5GiB", "512MiB", "7".
/// Units are case-insensitive and binary (k = 1024). A fractional result is rounded down to whole
/// bytes. Only plain decimals are accepted: no sign, no exponent, no NaN or infinity.
///
/// Example:
/// \code
///   std::uint64_t n = distorch::parse_bytes("2.5gb");   // 2684354560
///   std::string s = distorch::format_bytes(n);          // "2.50 GiB"
/// \endcode

#include <array>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "distorch/core/error.hpp"

namespace distorch::inline v0 {

/// Outcome of `try_parse_bytes`: a value, or a problem with the 0-based index of the first bad
/// character.
struct bytes_parse_result {
  std::uint64_t value = 0;
  std::string problem;    ///< empty on success
  std::size_t index = 0;  ///< where the problem starts
  std::string fix;
  /// True when the text was a valid size.
  /// \code if (auto r = distorch::try_parse_bytes("2.5gb"); r.ok()) use(r.value); \endcode
  bool ok() const noexcept { return problem.empty(); }
};

namespace detail {

inline char ascii_lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

inline bool iequals(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (ascii_lower(a[i]) != ascii_lower(b[i])) return false;
  return true;
}

/// Multiplier of a unit suffix, or 0 when unknown.
inline std::uint64_t byte_unit_multiplier(std::string_view unit) noexcept {
  struct entry { std::string_view names[3]; std::uint64_t mult; };
  static constexpr std::array<entry, 6> table{{
      {{"", "b", "byte"}, 1ull},
      {{"k", "kb", "kib"}, 1ull << 10},
      {{"m", "mb", "mib"}, 1ull << 20},
      {{"g", "gb", "gib"}, 1ull << 30},
      {{"t", "tb", "tib"}, 1ull << 40},
      {{"p", "pb", "pib"}, 1ull << 50},
  }};
  for (const auto& e : table)
    for (auto name : e.names)
      if (iequals(unit, name) && (unit.empty() == name.empty())) return e.mult;
  if (iequals(unit, "bytes")) return 1;
  return 0;
}

// 128-bit intermediate so a size times its unit multiplier can be checked for 64-bit overflow.
__extension__ using uint128 = unsigned __int128;

inline constexpr std::string_view byte_size_fix = "write a size such as 2.5gb, 500mb, 1024k, 4096b or 7";

}  // namespace detail

/// Parses a byte quantity without throwing. Leading and trailing spaces are ignored.
/// \code
///   auto r = distorch::try_parse_bytes("1.5GiB");
///   if (r.ok()) use(r.value); else report(r.problem, r.index);
/// \endcode
inline bytes_parse_result try_parse_bytes(std::string_view text) {
  bytes_parse_result result;
  auto fail = [&](std::size_t index, std::string problem, std::string fix = std::string(detail::byte_size_fix)) {
    result.problem = std::move(problem);
    result.index = index;
    result.fix = std::move(fix);
    return result;
  };
  std::size_t begin = 0;
  std::size_t end = text.size();
  while (begin < end && (text[begin] == ' ' || text[begin] == '\t')) ++begin;
  while (end > begin && (text[end - 1] == ' ' || text[end - 1] == '\t')) --end;
  if (begin == end) return fail(begin, "empty size");
  std::size_t i = begin;
  if (text[i] == '-') return fail(i, "negative size", "sizes cannot be negative; write a size such as 2.5gb");
  if (text[i] == '+') ++i;
  detail::uint128 integer = 0;
  std::size_t integer_digits = 0;
  constexpr detail::uint128 limit = static_cast<detail::uint128>(~0ull);
  bool too_large = false;
  for (; i < end && text[i] >= '0' && text[i] <= '9'; ++i, ++integer_digits) {
    integer = integer * 10 + static_cast<unsigned>(text[i] - '0');
    if (integer > limit) too_large = true, integer = limit + 1;
  }
  detail::uint128 fraction = 0;
  detail::uint128 fraction_scale = 1;
  std::size_t fraction_digits = 0;
  if (i < end && text[i] == '.') {
    ++i;
    for (; i < end && text[i] >= '0' && text[i] <= '9'; ++i, ++fraction_digits) {
      if (fraction_digits < 18) {  // finer than 1e-18 of a unit never changes the byte count
        fraction = fraction * 10 + static_cast<unsigned>(text[i] - '0');
        fraction_scale *= 10;
      }
    }
  }
  if (integer_digits == 0 && fraction_digits == 0) {
    std::string_view rest = text.substr(i, end - i);
    if (detail::iequals(rest.substr(0, 3), "nan") || detail::iequals(rest.substr(0, 3), "inf"))
      return fail(i, "'" + std::string(rest) + "' is not a finite size");
    return fail(i, "a size must start with a number");
  }
  std::string_view unit = text.substr(i, end - i);
  while (!unit.empty() && unit.front() == ' ') unit.remove_prefix(1), ++i;
  if (!unit.empty() && (unit.front() == 'e' || unit.front() == 'E') && unit.size() > 1 &&
      (unit[1] == '+' || unit[1] == '-' || (unit[1] >= '0' && unit[1] <= '9')))
    return fail(i, "exponent notation is not accepted", "write the size with a unit instead, e.g. 1.5gb");
  const std::uint64_t multiplier = detail::byte_unit_multiplier(unit);
  if (multiplier == 0) return fail(i, "'" + std::string(unit) + "' is not a byte unit", "use b, k, kb, kib, m, mb, mib, g, gb, gib, t, tb or tib");
  const detail::uint128 whole = too_large ? limit + 1 : integer * multiplier;
  const detail::uint128 part = fraction * multiplier / fraction_scale;
  if (too_large || whole > limit || whole + part > limit)
    return fail(begin, "size does not fit in 64 bits", "sizes must be below 16 EiB");
  result.value = static_cast<std::uint64_t>(whole + part);
  return result;
}

/// Parses a byte quantity; throws `allocation_error` naming the text and the column (1-based).
/// \code
///   auto budget = distorch::parse_bytes("512MiB");   // 536870912
/// \endcode
inline std::uint64_t parse_bytes(std::string_view text) {
  auto r = try_parse_bytes(text);
  if (!r.ok())
    throw allocation_error({"parsing byte size", std::string(text), error_position{"column", r.index + 1}, r.problem, r.fix});
  return r.value;
}

/// Human-readable binary size: "7 B", "1.00 KiB", "2.50 GiB".
/// \code
///   distorch::format_bytes(3 << 20);   // "3.00 MiB"
/// \endcode
inline std::string format_bytes(std::uint64_t bytes) {
  static constexpr std::array<const char*, 7> units{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double value = static_cast<double>(bytes);
  std::size_t u = 0;
  while (value >= 1024.0 && u + 1 < units.size()) value /= 1024.0, ++u;
  std::array<char, 32> buffer{};
  std::snprintf(buffer.data(), buffer.size(), "%.2f %s", value, units[u]);
  return buffer.data();
}

}  // namespace distorch::inline v0
