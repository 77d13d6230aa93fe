#pragma once
/// \file
/// `profile`: what a machine's copy links can do, as a saved value. Each measured link (host
/// memcpy, host→device from pinned and from pageable memory, device→host, device→device with or
/// without peer access) keeps its (size, median seconds) samples and the line fitted through them,
/// `t = latency + bytes / bandwidth`. Links a machine does not have are listed as absent with the
/// reason, never invented. The profile is written and read as JSON; the reader is strict, so a
/// hand-edited what-if profile (a PCIe 5 link, say) fails on its first wrong field, by path.
/// Pure C++20: no LibTorch (profiler.hpp measures; predictor.hpp uses).
///
/// Example:
/// \code
///   distorch::profile p = distorch::read_profile_file("h100.json");
///   const distorch::link_profile* h2d =
///       p.find(distorch::link_kind::host_to_device_pinned, distorch::device_id::cpu(), distorch::device_id::cuda(0));
///   double seconds = h2d->seconds_for(1 << 30);   // latency + 1 GiB / bandwidth
///   std::string text = distorch::profile_to_json(p).dump(2);
/// \endcode

#include <array>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <initializer_list>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "distorch/core/config.hpp"
#include "distorch/core/error.hpp"
#include "distorch/core/json_file.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/device/topology.hpp"

namespace distorch::inline v0 {

/// The kinds of copy a profile measures.
enum class link_kind : std::uint8_t {
  host_memcpy,              ///< host RAM to host RAM (CPU and simulated devices)
  host_to_device_pinned,    ///< page-locked host memory to an accelerator
  host_to_device_pageable,  ///< ordinary host memory to an accelerator
  device_to_host,           ///< accelerator to page-locked host memory
  device_to_device_peer,    ///< accelerator to another, with peer-to-peer access
  device_to_device,         ///< accelerator to another, without peer access (staged by the driver)
};

/// The name used in JSON and in text: "host_memcpy", "host_to_device_pinned", ...
/// \code distorch::link_kind_name(distorch::link_kind::device_to_host);   // "device_to_host" \endcode
constexpr std::string_view link_kind_name(link_kind k) noexcept {
  constexpr std::array<std::string_view, 6> names{"host_memcpy",    "host_to_device_pinned", "host_to_device_pageable",
                                                  "device_to_host", "device_to_device_peer", "device_to_device"};
  return names[static_cast<std::size_t>(k)];
}

/// The kind of a name, or nullopt.
/// \code auto k = distorch::link_kind_from_name("host_memcpy"); \endcode
inline std::optional<link_kind> link_kind_from_name(std::string_view name) noexcept {
  for (auto k : {link_kind::host_memcpy, link_kind::host_to_device_pinned, link_kind::host_to_device_pageable,
                 link_kind::device_to_host, link_kind::device_to_device_peer, link_kind::device_to_device})
    if (link_kind_name(k) == name) return k;
  return std::nullopt;
}

/// One measured size: the median of the timed repeats.
struct link_sample {
  std::uint64_t bytes = 0;
  double seconds = 0;  ///< > 0
  friend bool operator==(const link_sample&, const link_sample&) = default;
};

/// Bandwidth and latency of the line `t = latency + bytes / bandwidth`.
struct link_fit {
  double bandwidth = 0;  ///< bytes per second, > 0
  double latency = 0;    ///< seconds, >= 0
  friend bool operator==(const link_fit&, const link_fit&) = default;
};

/// Least-squares fit of `t = latency + bytes / bandwidth` over the samples. The intercept is
/// clamped at 0: when the free fit gives a negative latency (or a non-positive slope, from noise
/// or a single size), the line through the origin (slope Σ s·t / Σ s²) is used instead, so the
/// figures stay physical. nullopt without samples or with a sample of 0 bytes or seconds <= 0.
/// \code
///   std::vector<distorch::link_sample> s{{1 << 20, 1e-4}, {16 << 20, 1.5e-3}};
///   auto fit = distorch::fit_link(s);   // fit->bandwidth in bytes/s, fit->latency in s
/// \endcode
inline std::optional<link_fit> fit_link(std::span<const link_sample> samples) {
  if (samples.empty()) return std::nullopt;
  double n = 0, mean_s = 0, mean_t = 0;
  for (const auto& x : samples) {
    if (x.bytes == 0 || !(x.seconds > 0) || !std::isfinite(x.seconds)) return std::nullopt;
    n += 1;
    mean_s += static_cast<double>(x.bytes);
    mean_t += x.seconds;
  }
  mean_s /= n;
  mean_t /= n;
  double sss = 0, sst = 0, s2 = 0, st = 0;
  for (const auto& x : samples) {
    const double s = static_cast<double>(x.bytes);
    sss += (s - mean_s) * (s - mean_s);
    sst += (s - mean_s) * (x.seconds - mean_t);
    s2 += s * s;
    st += s * x.seconds;
  }
  double slope = sss > 0 ? sst / sss : 0;
  double intercept = mean_t - slope * mean_s;
  if (!(slope > 0) || intercept < 0) {
    slope = st / s2;  // > 0: every sample has bytes > 0 and seconds > 0
    intercept = 0;
  }
  return link_fit{1.0 / slope, intercept};
}

/// One link of a profile.
struct link_profile {
  link_kind kind = link_kind::host_memcpy;
  device_id source = device_id::cpu();
  device_id destination = device_id::cpu();
  std::vector<link_sample> samples;  ///< by size; may be empty in a hand-written profile
  double bandwidth = 0;              ///< bytes per second, > 0
  double latency = 0;                ///< seconds, >= 0

  /// Seconds to copy `bytes` over this link: latency + bytes / bandwidth.
  /// \code double t = link.seconds_for(256 << 20); \endcode
  double seconds_for(std::uint64_t bytes) const noexcept { return latency + static_cast<double>(bytes) / bandwidth; }

  /// "cpu -> cuda:0 (host_to_device_pinned)"
  std::string str() const { return source.str() + " -> " + destination.str() + " (" + std::string(link_kind_name(kind)) + ")"; }

  friend bool operator==(const link_profile&, const link_profile&) = default;
};

/// A link the profiler looked for and did not find, with the reason.
struct absent_link {
  link_kind kind = link_kind::host_to_device_pageable;
  std::string reason;  ///< "no accelerator: LibTorch reports no CUDA device"
  friend bool operator==(const absent_link&, const absent_link&) = default;
};

/// One device of the profiled machine.
struct profiled_device {
  device_id device;
  std::string name;
  std::uint64_t total_bytes = 0;
  friend bool operator==(const profiled_device&, const profiled_device&) = default;
};

/// Where a profile comes from and what it ran on.
struct machine_description {
  std::string origin;    ///< "measured", "built-in conservative default", or anything a person writes
  std::string host;      ///< host name
  std::string cpu;       ///< CPU model
  std::string libtorch;  ///< LibTorch version the profiler ran with
  std::string distorch;  ///< distorch version
  std::string date;      ///< UTC, ISO 8601
  std::vector<profiled_device> devices;
  friend bool operator==(const machine_description&, const machine_description&) = default;
};

/// A whole profile. `version` is the JSON format version (1).
struct profile {
  static constexpr std::uint64_t format_version = 1;
  machine_description machine;
  std::uint64_t repeats = 0;  ///< timed repeats per size (the median is kept)
  std::uint64_t warmup = 0;   ///< untimed copies before them
  std::vector<link_profile> links;
  std::vector<absent_link> absent;

  /// The link of this kind between these devices, or nullptr.
  /// \code auto* l = p.find(distorch::link_kind::host_memcpy, distorch::device_id::cpu(), distorch::device_id::cpu()); \endcode
  const link_profile* find(link_kind kind, const device_id& source, const device_id& destination) const noexcept {
    for (const auto& l : links)
      if (l.kind == kind && l.source == source && l.destination == destination) return &l;
    return nullptr;
  }

  friend bool operator==(const profile&, const profile&) = default;
};

/// Links with figures chosen to be at or below what common hardware does, for predictions made
/// without a measured profile: host memcpy 5 GB/s (one thread, 1 µs), pinned host→device and
/// device→host 10 GB/s (below PCIe 3.0 x16's ~12), pageable host→device 5 GB/s, device→device
/// 8 GB/s without peer access and 20 GB/s with (10 µs each). Every accelerator of `devices` gets
/// its host links and, for each other accelerator, both device→device links. GB = 10^9 bytes.
/// \code
///   auto p = distorch::conservative_profile(distorch::parse_topology("cuda:0=24GiB,cpu=64GiB"));
/// \endcode
inline profile conservative_profile(const topology& devices) {
  profile p;
  p.machine.origin = "built-in conservative default";
  p.machine.distorch = std::string(version_string());
  auto add = [&](link_kind kind, device_id from, device_id to, double bandwidth, double latency) {
    p.links.push_back({kind, from, to, {}, bandwidth, latency});
  };
  add(link_kind::host_memcpy, device_id::cpu(), device_id::cpu(), 5e9, 1e-6);
  for (const auto& d : devices.devices) {
    p.machine.devices.push_back({d.id, d.name, d.total_bytes});
    if (d.id.is_host_backed()) continue;
    add(link_kind::host_to_device_pinned, device_id::cpu(), d.id, 10e9, 10e-6);
    add(link_kind::host_to_device_pageable, device_id::cpu(), d.id, 5e9, 10e-6);
    add(link_kind::device_to_host, d.id, device_id::cpu(), 10e9, 10e-6);
    for (const auto& other : devices.devices) {
      if (other.id.is_host_backed() || other.id == d.id) continue;
      add(link_kind::device_to_device_peer, d.id, other.id, 20e9, 10e-6);
      add(link_kind::device_to_device, d.id, other.id, 8e9, 10e-6);
    }
  }
  return p;
}

/// The profile as JSON (docs/profiling.md lists every field).
/// \code std::cout << distorch::profile_to_json(p).dump(2); \endcode
inline nlohmann::json profile_to_json(const profile& p) {
  nlohmann::json devices = nlohmann::json::array();
  for (const auto& d : p.machine.devices)
    devices.push_back({{"device", d.device.str()}, {"name", d.name}, {"total_bytes", d.total_bytes}});
  nlohmann::json links = nlohmann::json::array();
  for (const auto& l : p.links) {
    nlohmann::json samples = nlohmann::json::array();
    for (const auto& s : l.samples) samples.push_back({{"bytes", s.bytes}, {"seconds", s.seconds}});
    links.push_back({{"kind", std::string(link_kind_name(l.kind))},
                     {"source", l.source.str()},
                     {"destination", l.destination.str()},
                     {"samples", std::move(samples)},
                     {"bandwidth", l.bandwidth},
                     {"latency", l.latency}});
  }
  nlohmann::json absent = nlohmann::json::array();
  for (const auto& a : p.absent) absent.push_back({{"kind", std::string(link_kind_name(a.kind))}, {"reason", a.reason}});
  return {{"format", "distorch-profile"},
          {"version", profile::format_version},
          {"machine",
           {{"origin", p.machine.origin},
            {"host", p.machine.host},
            {"cpu", p.machine.cpu},
            {"libtorch", p.machine.libtorch},
            {"distorch", p.machine.distorch},
            {"date", p.machine.date},
            {"devices", std::move(devices)}}},
          {"repeats", p.repeats},
          {"warmup", p.warmup},
          {"links", std::move(links)},
          {"absent", std::move(absent)}};
}

namespace detail {

/// Field-by-field reading with the path of the field in every error.
struct profile_json_reader {
  [[noreturn]] static void fail(const std::string& field, std::string problem,
                                std::string fix = "write the profile as distorch profile --json does (docs/profiling.md)") {
    throw format_error({"reading profile JSON", field, std::nullopt, std::move(problem), std::move(fix)});
  }
  static std::string join(const std::string& path, std::string_view key) {
    return path.empty() ? std::string(key) : path + '.' + std::string(key);
  }
  /// Every key of `object` must be one of `known`: a misspelt field is an error, not ignored.
  static void only(const nlohmann::json& object, const std::string& path, std::initializer_list<std::string_view> known) {
    for (auto it = object.begin(); it != object.end(); ++it) {
      bool ok = false;
      for (auto k : known) ok = ok || it.key() == k;
      if (!ok) fail(join(path, it.key()), "unknown field", "remove it; profile version 1 has no such field");
    }
  }
  static const nlohmann::json& object_at(const nlohmann::json& v, const std::string& path) {
    if (!v.is_object()) fail(path.empty() ? "(root)" : path, std::string("expected an object, found ") + v.type_name());
    return v;
  }
  static const nlohmann::json& member(const nlohmann::json& object, const std::string& path, std::string_view key) {
    auto it = object.find(std::string(key));
    if (it == object.end()) fail(join(path, key), "missing field");
    return *it;
  }
  static std::string string_of(const nlohmann::json& object, const std::string& path, std::string_view key) {
    const auto& v = member(object, path, key);
    if (!v.is_string()) fail(join(path, key), std::string("expected a string, found ") + v.type_name());
    return v.get<std::string>();
  }
  static std::uint64_t u64_of(const nlohmann::json& object, const std::string& path, std::string_view key) {
    const auto& v = member(object, path, key);
    // JSON built in memory holds small literals as signed integers; parsed JSON as unsigned.
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0))
      fail(join(path, key), v.is_number_integer() ? "expected a non-negative integer, found a negative one"
                                                  : std::string("expected a non-negative integer, found ") + v.type_name());
    return v.get<std::uint64_t>();
  }
  /// A finite number; `positive` demands > 0, else >= 0.
  static double number_of(const nlohmann::json& object, const std::string& path, std::string_view key, bool positive) {
    const auto& v = member(object, path, key);
    if (!v.is_number()) fail(join(path, key), std::string("expected a number, found ") + v.type_name());
    const double x = v.get<double>();
    if (!std::isfinite(x)) fail(join(path, key), "not a finite number", "write a finite number");
    if (positive ? !(x > 0) : x < 0)
      fail(join(path, key), positive ? "must be greater than 0" : "must not be negative",
           positive ? "write a positive number" : "write 0 or a positive number");
    return x;
  }
  static device_id device_of(const nlohmann::json& object, const std::string& path, std::string_view key) {
    const std::string text = string_of(object, path, key);
    auto id = device_id::try_parse(text);
    if (!id.ok()) fail(join(path, key), "'" + text + "': " + id.problem, id.fix);
    return *id.id;
  }
  static link_kind kind_of(const nlohmann::json& object, const std::string& path) {
    const std::string text = string_of(object, path, "kind");
    auto k = link_kind_from_name(text);
    if (!k)
      fail(join(path, "kind"), "unknown link kind '" + text + "'",
           "use host_memcpy, host_to_device_pinned, host_to_device_pageable, device_to_host, device_to_device_peer or "
           "device_to_device");
    return *k;
  }
  static const nlohmann::json& array_of(const nlohmann::json& object, const std::string& path, std::string_view key) {
    const auto& v = member(object, path, key);
    if (!v.is_array()) fail(join(path, key), std::string("expected an array, found ") + v.type_name());
    return v;
  }
  /// The devices must suit the kind: host links start or end at cpu, device links at accelerators.
  static void check_link_devices(const link_profile& l, const std::string& path) {
    const bool src_host = l.source.is_cpu(), dst_host = l.destination.is_cpu();
    const bool src_dev = !l.source.is_host_backed(), dst_dev = !l.destination.is_host_backed();
    const std::string kind(link_kind_name(l.kind));
    switch (l.kind) {
      case link_kind::host_memcpy:
        if (!src_host) fail(path + ".source", kind + " starts at cpu", "write \"cpu\"");
        if (!dst_host) fail(path + ".destination", kind + " ends at cpu", "write \"cpu\"");
        break;
      case link_kind::host_to_device_pinned:
      case link_kind::host_to_device_pageable:
        if (!src_host) fail(path + ".source", kind + " starts at cpu", "write \"cpu\"");
        if (!dst_dev) fail(path + ".destination", kind + " ends at an accelerator", "write a device such as cuda:0");
        break;
      case link_kind::device_to_host:
        if (!src_dev) fail(path + ".source", kind + " starts at an accelerator", "write a device such as cuda:0");
        if (!dst_host) fail(path + ".destination", kind + " ends at cpu", "write \"cpu\"");
        break;
      case link_kind::device_to_device_peer:
      case link_kind::device_to_device:
        if (!src_dev) fail(path + ".source", kind + " starts at an accelerator", "write a device such as cuda:0");
        if (!dst_dev) fail(path + ".destination", kind + " ends at an accelerator", "write a device such as cuda:1");
        if (l.source == l.destination)
          fail(path + ".destination", kind + " joins two different devices", "write another device than the source");
        break;
    }
  }
};

}  // namespace detail

/// Reads a profile written by `profile_to_json` (or by hand). Throws `format_error` naming the
/// first wrong field by its path (`links[2].samples[0].seconds`, `machine.devices[1].device`):
/// missing or unknown fields, wrong types, negative, zero or non-finite figures, unknown link
/// kinds, devices that do not suit the kind, a link listed twice, another format or version.
/// \code
///   auto p = distorch::profile_from_json(nlohmann::json::parse(text));
/// \endcode
inline profile profile_from_json(const nlohmann::json& j) {
  using r = detail::profile_json_reader;
  r::object_at(j, "");
  r::only(j, "", {"format", "version", "machine", "repeats", "warmup", "links", "absent"});
  if (r::string_of(j, "", "format") != "distorch-profile")
    r::fail("format", "not a distorch profile", "the field must be \"distorch-profile\"");
  if (r::u64_of(j, "", "version") != profile::format_version)
    r::fail("version", "unsupported profile version", "this distorch reads version 1; measure again with distorch profile");
  profile p;
  const auto& m = r::object_at(r::member(j, "", "machine"), "machine");
  r::only(m, "machine", {"origin", "host", "cpu", "libtorch", "distorch", "date", "devices"});
  p.machine.origin = r::string_of(m, "machine", "origin");
  p.machine.host = r::string_of(m, "machine", "host");
  p.machine.cpu = r::string_of(m, "machine", "cpu");
  p.machine.libtorch = r::string_of(m, "machine", "libtorch");
  p.machine.distorch = r::string_of(m, "machine", "distorch");
  p.machine.date = r::string_of(m, "machine", "date");
  const auto& devices = r::array_of(m, "machine", "devices");
  for (std::size_t i = 0; i < devices.size(); ++i) {
    const std::string path = "machine.devices[" + std::to_string(i) + "]";
    const auto& d = r::object_at(devices[i], path);
    r::only(d, path, {"device", "name", "total_bytes"});
    p.machine.devices.push_back({r::device_of(d, path, "device"), r::string_of(d, path, "name"), r::u64_of(d, path, "total_bytes")});
  }
  p.repeats = r::u64_of(j, "", "repeats");
  p.warmup = r::u64_of(j, "", "warmup");
  const auto& links = r::array_of(j, "", "links");
  for (std::size_t i = 0; i < links.size(); ++i) {
    const std::string path = "links[" + std::to_string(i) + "]";
    const auto& l = r::object_at(links[i], path);
    r::only(l, path, {"kind", "source", "destination", "samples", "bandwidth", "latency"});
    link_profile link;
    link.kind = r::kind_of(l, path);
    link.source = r::device_of(l, path, "source");
    link.destination = r::device_of(l, path, "destination");
    r::check_link_devices(link, path);
    if (p.find(link.kind, link.source, link.destination))
      r::fail(path, "link " + link.str() + " is listed twice", "list each link once");
    const auto& samples = r::array_of(l, path, "samples");
    for (std::size_t k = 0; k < samples.size(); ++k) {
      const std::string sp = path + ".samples[" + std::to_string(k) + "]";
      const auto& s = r::object_at(samples[k], sp);
      r::only(s, sp, {"bytes", "seconds"});
      const std::uint64_t bytes = r::u64_of(s, sp, "bytes");
      if (bytes == 0) r::fail(sp + ".bytes", "must be greater than 0", "write the copied size in bytes");
      link.samples.push_back({bytes, r::number_of(s, sp, "seconds", true)});
    }
    link.bandwidth = r::number_of(l, path, "bandwidth", true);
    link.latency = r::number_of(l, path, "latency", false);
    p.links.push_back(std::move(link));
  }
  const auto& absent = r::array_of(j, "", "absent");
  for (std::size_t i = 0; i < absent.size(); ++i) {
    const std::string path = "absent[" + std::to_string(i) + "]";
    const auto& a = r::object_at(absent[i], path);
    r::only(a, path, {"kind", "reason"});
    p.absent.push_back({r::kind_of(a, path), r::string_of(a, path, "reason")});
  }
  return p;
}

/// Reads a profile file. Throws `format_error` for an unreadable file, invalid JSON (with the
/// byte offset) or a wrong field (as `profile_from_json`).
/// \code auto p = distorch::read_profile_file("profile.json"); \endcode
inline profile read_profile_file(const std::string& path) {
  return profile_from_json(detail::read_json_file(path, "reading profile",
                                                  "give the path of a profile written by distorch profile --out FILE",
                                                  "write the profile as distorch profile --json does"));
}

/// Writes a profile file (JSON, indented). Throws `device_error` when the file cannot be written.
/// \code distorch::write_profile_file(p, "profile.json"); \endcode
inline void write_profile_file(const profile& p, const std::string& path) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (out) out << profile_to_json(p).dump(2) << '\n';
  if (!out)
    throw device_error({"writing profile", path, std::nullopt, "cannot write the file", "give a path in a writable folder"});
}

}  // namespace distorch::inline v0
