#pragma once
/// \file
/// `measure_profile`: times the copy links of this machine and returns a `profile`
/// (profile/profile.hpp). For every size, each link gets `warmup` untimed copies (they fault the
/// pages in and wake the link), then `repeats` timed copies whose median is kept; a line
/// `t = latency + bytes / bandwidth` is fitted through the medians.
///
/// What is measured, among the devices `discover()` finds:
/// - host memcpy (cpu → cpu) with LibTorch's `copy_`, the call the runtime copies with;
/// - per CUDA device: host→device from pinned and from pageable memory, device→host into pinned
///   memory; per ordered pair of CUDA devices: device→device, reported as peer-to-peer when the
///   CUDA runtime says the pair can access each other (LibTorch then enables peer access).
/// Links this machine lacks (no CUDA device: no host→device at all) are listed as absent with
/// the reason instead of being invented. Each timed copy is bracketed by stream synchronisation
/// of the devices involved, so the time is the copy's, from queueing to completion (including
/// the launch latency the fit reports).
///
/// Example:
/// \code
///   distorch::profiler_options options;
///   options.sizes = {1 << 20, 16 << 20, 64 << 20};
///   options.progress = [](const distorch::progress_report& r) { std::fprintf(stderr, "%llu/%llu\r", r.done, r.total); };
///   distorch::profile p = distorch::measure_profile(options);
///   distorch::write_profile_file(p, "profile.json");
/// \endcode

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/api/include/torch/version.h>

#include "distorch/core/bytes.hpp"
#include "distorch/core/config.hpp"
#include "distorch/core/error.hpp"
#include "distorch/core/progress.hpp"
#include "distorch/device/discover.hpp"
#include "distorch/device/memory_info.hpp"
#include "distorch/profile/profile.hpp"

namespace distorch::inline v0 {

/// What the profiler measures and how often.
struct profiler_options {
  /// Copy sizes in bytes; several, so latency and bandwidth can be told apart.
  std::vector<std::uint64_t> sizes{1ull << 20, 4ull << 20, 16ull << 20, 64ull << 20, 256ull << 20};
  /// Timed copies per size and link; the median is kept.
  std::size_t repeats = 5;
  /// Untimed copies before them.
  std::size_t warmup = 1;
  /// The devices to profile; default `discover()`. Only cpu and CUDA devices are measured.
  std::optional<topology> devices{};
  /// Called after every (link, size) measured: done / total such steps.
  progress_callback progress{};
};

namespace detail {

inline std::string first_cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  return "unknown";
}

inline std::string utc_now_iso() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

/// Whether CUDA device `a` can access device `b` directly, from the CUDA runtime LibTorch loaded.
inline std::optional<bool> cuda_can_access_peer(int a, int b) {
  static const auto api = load_cuda_runtime();
  if (!api.handle) return std::nullopt;
  using fn = int (*)(int*, int, int);
  static const auto can_access = reinterpret_cast<fn>(dlsym(api.handle, "cudaDeviceCanAccessPeer"));
  if (!can_access) return std::nullopt;
  int result = 0;
  if (can_access(&result, a, b) != 0) return std::nullopt;
  return result != 0;
}

/// Times `copy` (which must leave the copy complete on return) and keeps the median.
template <class Copy>
double median_seconds(Copy&& copy, std::size_t warmup, std::size_t repeats) {
  for (std::size_t i = 0; i < warmup; ++i) copy();
  std::vector<double> times;
  times.reserve(repeats);
  for (std::size_t i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    copy();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  const std::size_t mid = times.size() / 2;
  return times.size() % 2 == 1 ? times[mid] : (times[mid - 1] + times[mid]) / 2;
}

inline at::Tensor profile_buffer(std::uint64_t bytes, c10::Device device, bool pinned) {
  try {
    auto t = at::empty({static_cast<std::int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device).pinned_memory(pinned));
    t.fill_(1);  // touch every page before any copy is timed
    return t;
  } catch (const std::bad_alloc&) {
    throw device_error({"profiling copies", device.str(), std::nullopt, "out of memory allocating " + format_bytes(bytes),
                        "profile with smaller sizes (--sizes 1mb,16mb,64mb)"});
  } catch (const c10::Error& e) {
    std::string why = e.what_without_backtrace();
    throw device_error({"profiling copies", device.str(), std::nullopt,
                        "cannot allocate " + format_bytes(bytes) + ": " + why.substr(0, why.find('\n')),
                        "profile with smaller sizes (--sizes 1mb,16mb,64mb)"});
  }
}

}  // namespace detail

/// Measures every link among the cpu and the CUDA devices (see the file comment). Throws
/// `device_error` when a buffer cannot be allocated and `placement_error` for empty sizes or
/// zero repeats.
/// \code
///   auto p = distorch::measure_profile({.sizes = {1 << 20, 8 << 20}, .repeats = 3});
///   p.find(distorch::link_kind::host_memcpy, distorch::device_id::cpu(), distorch::device_id::cpu())->bandwidth;
/// \endcode
inline profile measure_profile(const profiler_options& options = {}) {
  if (options.sizes.empty() || options.repeats == 0)
    throw placement_error({"profiling copies", options.sizes.empty() ? "sizes" : "repeats", std::nullopt,
                           options.sizes.empty() ? "no copy sizes given" : "0 timed repeats",
                           "give at least one size (several to fit latency) and at least one repeat"});
  for (auto s : options.sizes)
    if (s == 0)
      throw placement_error({"profiling copies", "0", std::nullopt, "a copy size of 0 bytes measures nothing", "give sizes such as 1mb,16mb"});
  std::vector<std::uint64_t> sizes = options.sizes;
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());

  const topology devices = options.devices ? *options.devices : discover();
  profile p;
  p.machine.origin = "measured";
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) == 0) p.machine.host = host;
  p.machine.cpu = detail::first_cpu_model();
  p.machine.libtorch = TORCH_VERSION;
  p.machine.distorch = std::string(version_string());
  p.machine.date = detail::utc_now_iso();
  p.repeats = options.repeats;
  p.warmup = options.warmup;
  for (const auto& d : devices.devices) p.machine.devices.push_back({d.id, d.name, d.total_bytes});

  std::vector<int> gpus;
  const int cuda_count = torch_device_count(c10::DeviceType::CUDA);
  for (const auto& d : devices.devices)
    if (d.id.kind == device_kind::cuda && d.id.index < cuda_count) gpus.push_back(d.id.index);
  for (const auto& d : devices.devices)
    if (!d.id.is_host_backed() && d.id.kind != device_kind::cuda)
      p.absent.push_back({link_kind::host_to_device_pinned,
                          d.id.str() + " is not measured: the profiler times CUDA devices only (write its links by hand)"});
  if (gpus.empty()) {
    const std::string why = cuda_count == 0 ? "no accelerator: this LibTorch reports no CUDA device"
                                            : "no CUDA device among the profiled devices";
    for (auto k : {link_kind::host_to_device_pinned, link_kind::host_to_device_pageable, link_kind::device_to_host,
                   link_kind::device_to_device_peer, link_kind::device_to_device})
      p.absent.push_back({k, why});
  } else if (gpus.size() == 1) {
    p.absent.push_back({link_kind::device_to_device_peer, "one CUDA device: no device-to-device link"});
    p.absent.push_back({link_kind::device_to_device, "one CUDA device: no device-to-device link"});
  }

  const std::uint64_t total = sizes.size() * (1 + gpus.size() * 3 + gpus.size() * (gpus.size() > 0 ? gpus.size() - 1 : 0));
  std::uint64_t done = 0;
  auto measure = [&](link_kind kind, device_id from, device_id to, auto&& copy_of_size) {
    link_profile link{kind, from, to, {}, 0, 0};
    for (auto bytes : sizes) {
      link.samples.push_back({bytes, std::max(copy_of_size(bytes), 1e-9)});
      report_progress(options.progress, "profiling copies", ++done, total, "measurements");
    }
    const auto fit = fit_link(link.samples);
    link.bandwidth = fit->bandwidth;
    link.latency = fit->latency;
    p.links.push_back(std::move(link));
  };

  const c10::Device cpu(c10::DeviceType::CPU);
  measure(link_kind::host_memcpy, device_id::cpu(), device_id::cpu(), [&](std::uint64_t bytes) {
    auto src = detail::profile_buffer(bytes, cpu, false);
    auto dst = detail::profile_buffer(bytes, cpu, false);
    return detail::median_seconds([&] { dst.copy_(src); }, options.warmup, options.repeats);
  });
  if (gpus.empty()) return p;

  // CUDA: every timed copy is synchronised on the streams of the devices it touches, so the
  // clock stops when the bytes have landed. (LibTorch's copy_ with non_blocking=false already
  // waits for host<->device copies; device<->device copies need the explicit wait.)
  const c10::impl::VirtualGuardImpl cuda(c10::DeviceType::CUDA);
  auto gpu_device = [](int i) { return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(i)); };
  auto sync = [&](c10::Device d) { cuda.synchronizeStream(cuda.getStream(d)); };
  for (int g : gpus) {
    const auto dev = gpu_device(g);
    auto timed_h2d = [&](bool pinned) {
      return [&, pinned](std::uint64_t bytes) {
        auto src = detail::profile_buffer(bytes, cpu, pinned);
        auto dst = detail::profile_buffer(bytes, dev, false);
        sync(dev);
        return detail::median_seconds([&] { dst.copy_(src); sync(dev); }, options.warmup, options.repeats);
      };
    };
    measure(link_kind::host_to_device_pinned, device_id::cpu(), device_id::cuda(g), timed_h2d(true));
    measure(link_kind::host_to_device_pageable, device_id::cpu(), device_id::cuda(g), timed_h2d(false));
    measure(link_kind::device_to_host, device_id::cuda(g), device_id::cpu(), [&](std::uint64_t bytes) {
      auto src = detail::profile_buffer(bytes, dev, false);
      auto dst = detail::profile_buffer(bytes, cpu, true);
      sync(dev);
      return detail::median_seconds([&] { dst.copy_(src); sync(dev); }, options.warmup, options.repeats);
    });
  }
  for (int a : gpus)
    for (int b : gpus) {
      if (a == b) continue;
      const bool peer = detail::cuda_can_access_peer(a, b).value_or(false);
      measure(peer ? link_kind::device_to_device_peer : link_kind::device_to_device, device_id::cuda(a), device_id::cuda(b),
              [&](std::uint64_t bytes) {
                auto src = detail::profile_buffer(bytes, gpu_device(a), false);
                auto dst = detail::profile_buffer(bytes, gpu_device(b), false);
                sync(gpu_device(a));
                sync(gpu_device(b));
                return detail::median_seconds([&] { dst.copy_(src); sync(gpu_device(a)); sync(gpu_device(b)); }, options.warmup,
                                              options.repeats);
              });
    }
  if (gpus.size() > 1) {
    bool any_peer = false, any_plain = false;
    for (const auto& l : p.links) {
      any_peer = any_peer || l.kind == link_kind::device_to_device_peer;
      any_plain = any_plain || l.kind == link_kind::device_to_device;
    }
    if (!any_peer) p.absent.push_back({link_kind::device_to_device_peer, "no pair of CUDA devices has peer access"});
    if (!any_plain) p.absent.push_back({link_kind::device_to_device, "every pair of CUDA devices has peer access"});
  }
  return p;
}

}  // namespace distorch::inline v0
