#pragma once
/// \file
/// `device_id`: a value naming one device the way PyTorch users write it: `cpu`, `cuda:0`, `cuda`
/// (= `cuda:0`), `mps`, `xpu:1`, `npu:0`, `mlu:0`, and `sim:N` for simulated (CPU-backed) devices.
/// Pure C++: the mapping to `c10::Device` lives in device/torch_device.hpp.
///
/// Example:
/// \code
///   auto id = distorch::device_id::parse("cuda:1");
///   id.kind == distorch::device_kind::cuda;  id.index == 1;
///   id.str() == "cuda:1";
/// \endcode

#include <array>
#include <compare>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "distorch/core/error.hpp"

namespace distorch::inline v0 {

/// The device types distorch knows. `sim` is a simulated device backed by CPU memory.
enum class device_kind : std::uint8_t { cpu, cuda, mps, xpu, npu, mlu, sim };

/// Lower-case name of a kind, as written in device strings.
constexpr std::string_view kind_name(device_kind kind) noexcept {
  constexpr std::array<std::string_view, 7> names{"cpu", "cuda", "mps", "xpu", "npu", "mlu", "sim"};
  return names[static_cast<std::size_t>(kind)];
}

/// Result of `device_id::try_parse`: the id, or the problem and its 0-based character index.
struct device_id_parse_result;

/// A device name. Ordered by kind then index; hashable; printable with `str()`.
struct device_id {
  device_kind kind = device_kind::cpu;
  /// -1 for devices without an index (`cpu`, `mps`); >= 0 otherwise.
  int index = -1;

  constexpr device_id() = default;
  /// A device of kind `k` with index `i` (-1 for none).
  /// \code distorch::device_id d(distorch::device_kind::xpu, 1);   // "xpu:1" \endcode
  constexpr device_id(device_kind k, int i = -1) : kind(k), index(i) {}

  /// "cpu".
  /// \code distorch::device_id::cpu().str();   // "cpu" \endcode
  static constexpr device_id cpu() noexcept { return {device_kind::cpu, -1}; }
  /// "cuda:i".
  /// \code distorch::device_id::cuda(1).str();   // "cuda:1" \endcode
  static constexpr device_id cuda(int i) noexcept { return {device_kind::cuda, i}; }
  /// "sim:i", a simulated device (CPU-backed, fixed capacity).
  /// \code distorch::device_id::sim(0).str();   // "sim:0" \endcode
  static constexpr device_id sim(int i) noexcept { return {device_kind::sim, i}; }

  /// True for "cpu" only.
  bool is_cpu() const noexcept { return kind == device_kind::cpu; }
  /// True for devices whose memory is host RAM (cpu and simulated devices).
  bool is_host_backed() const noexcept { return kind == device_kind::cpu || kind == device_kind::sim; }

  /// "cpu", "cuda:0", "sim:3", "mps".
  std::string str() const {
    std::string s{kind_name(kind)};
    if (index >= 0) s += ':' + std::to_string(index);
    return s;
  }

  /// Parses without throwing.
  static device_id_parse_result try_parse(std::string_view text);

  /// Parses or throws `allocation_error` naming the text and the column.
  /// \code auto d = distorch::device_id::parse("xpu:1"); \endcode
  static device_id parse(std::string_view text);

  friend constexpr auto operator<=>(const device_id&, const device_id&) = default;
};

/// Outcome of `device_id::try_parse`: an id, or a problem with the 0-based index where it starts.
/// \code
///   auto r = distorch::device_id::try_parse("cuda:x");
///   if (!r.ok()) std::cerr << r.problem << " at " << r.index << "; " << r.fix << '\n';
/// \endcode
struct device_id_parse_result {
  std::optional<device_id> id;
  std::string problem;
  std::size_t index = 0;
  std::string fix;
  /// True when the text named a device.
  bool ok() const noexcept { return id.has_value(); }
};

inline device_id_parse_result device_id::try_parse(std::string_view text) {
  device_id_parse_result r;
  auto fail = [&](std::size_t index, std::string problem, std::string fix) {
    r.problem = std::move(problem);
    r.index = index;
    r.fix = std::move(fix);
    return r;
  };
  constexpr std::string_view known = "use cpu, cuda:N, mps, xpu:N, npu:N, mlu:N or sim:N";
  if (text.empty()) return fail(0, "empty device name", std::string(known));
  const std::size_t colon = text.find(':');
  const std::string_view type = text.substr(0, colon);
  std::optional<device_kind> kind;
  for (auto k : {device_kind::cpu, device_kind::cuda, device_kind::mps, device_kind::xpu, device_kind::npu,
                 device_kind::mlu, device_kind::sim}) {
    if (type == kind_name(k)) kind = k;
  }
  if (!kind) return fail(0, "unknown device type '" + std::string(type) + "'", std::string(known));
  const bool indexed = *kind != device_kind::cpu && *kind != device_kind::mps;
  if (colon == std::string_view::npos) {
    if (*kind == device_kind::sim) return fail(text.size(), "a simulated device needs an index", "write sim:0, sim:1, ...");
    r.id = device_id{*kind, indexed ? 0 : -1};
    return r;
  }
  const std::string_view digits = text.substr(colon + 1);
  if (!indexed) {
    // PyTorch accepts "cpu:0" and "mps:0" and means the only device.
    if (digits == "0") {
      r.id = device_id{*kind, -1};
      return r;
    }
    return fail(colon + 1, "'" + std::string(type) + "' has no device index '" + std::string(digits) + "'",
                "write plain " + std::string(type));
  }
  if (digits.empty()) return fail(colon + 1, "missing device index after ':'", "write e.g. " + std::string(type) + ":0");
  if (digits.front() == '-') return fail(colon + 1, "negative device index", "indices start at 0");
  int value = 0;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    const char c = digits[i];
    if (c < '0' || c > '9')
      return fail(colon + 1 + i, "device index '" + std::string(digits) + "' is not a number", "write e.g. " + std::string(type) + ":0");
    value = value * 10 + (c - '0');
    if (value > 65535) return fail(colon + 1, "device index too large", "indices are small integers such as 0 or 1");
  }
  r.id = device_id{*kind, value};
  return r;
}

inline device_id device_id::parse(std::string_view text) {
  auto r = try_parse(text);
  if (!r.ok())
    throw allocation_error({"parsing device name", std::string(text), error_position{"column", r.index + 1}, r.problem, r.fix});
  return *r.id;
}

}  // namespace distorch::inline v0

/// Hashing, so device ids can key unordered containers.
/// \code std::unordered_map<distorch::device_id, std::uint64_t> bytes_on; \endcode
template <>
struct std::hash<distorch::device_id> {
  /// Distinct for every kind and index a process can name.
  std::size_t operator()(const distorch::device_id& d) const noexcept {
    return (static_cast<std::size_t>(d.kind) << 20) ^ static_cast<std::size_t>(d.index + 1);
  }
};
