#pragma once
/// \file
/// Total and free memory of the host and of CUDA devices, read without LibTorch: host RAM from
/// `/proc/meminfo`, CUDA memory from the CUDA runtime found at run time. Looking the runtime up at
/// run time (instead of linking it) lets the same source compile on a machine without CUDA and
/// still find the GPUs of a PyTorch + CUDA install, whose `libcudart` LibTorch has already loaded.
///
/// Example:
/// \code
///   if (auto ram = distorch::host_memory()) std::cout << ram->total << ' ' << ram->free << '\n';
///   if (auto gpu = distorch::cuda_memory(0)) std::cout << gpu->free << " bytes free on cuda:0\n";
/// \endcode

#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace distorch::inline v0 {

/// Capacity and what can be had now, in bytes.
struct memory_figures {
  std::uint64_t total = 0;
  std::uint64_t free = 0;
  friend bool operator==(const memory_figures&, const memory_figures&) = default;
};

namespace detail {

/// Value in bytes of one `Key:   123 kB` line of /proc/meminfo, or nullopt.
inline std::optional<std::uint64_t> meminfo_field(std::string_view text, std::string_view key) {
  std::size_t at = 0;
  while (at < text.size()) {
    std::size_t end = text.find('\n', at);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(at, end - at);
    at = end + 1;
    if (line.size() <= key.size() || line.substr(0, key.size()) != key || line[key.size()] != ':') continue;
    std::size_t i = key.size() + 1;
    while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
    std::uint64_t value = 0;
    std::size_t digits = 0;
    for (; i < line.size() && line[i] >= '0' && line[i] <= '9'; ++i, ++digits) {
      if (value > (~0ull - 9) / 10) return std::nullopt;  // absurd value: do not wrap
      value = value * 10 + static_cast<unsigned>(line[i] - '0');
    }
    if (digits == 0) return std::nullopt;
    while (i < line.size() && line[i] == ' ') ++i;
    std::string_view unit = line.substr(i);
    while (!unit.empty() && (unit.back() == ' ' || unit.back() == '\r')) unit.remove_suffix(1);
    std::uint64_t scale = 1;
    if (unit == "kB") scale = 1024;
    else if (!unit.empty()) return std::nullopt;
    if (value > ~0ull / scale) return std::nullopt;
    return value * scale;
  }
  return std::nullopt;
}

}  // namespace detail

/// Host RAM from the text of `/proc/meminfo`: MemTotal, and MemAvailable as free (MemFree on
/// kernels older than 3.14, which lack MemAvailable). nullopt when MemTotal is missing.
/// \code
///   auto m = distorch::parse_meminfo("MemTotal: 1024 kB\nMemAvailable: 512 kB\n");   // {1 MiB, 512 KiB}
/// \endcode
inline std::optional<memory_figures> parse_meminfo(std::string_view text) {
  const auto total = detail::meminfo_field(text, "MemTotal");
  if (!total) return std::nullopt;
  auto available = detail::meminfo_field(text, "MemAvailable");
  if (!available) available = detail::meminfo_field(text, "MemFree");
  return memory_figures{*total, available ? std::min(*available, *total) : 0};
}

/// Host RAM now, from `/proc/meminfo`; nullopt where it cannot be read (not Linux, no /proc).
/// Container memory limits (cgroups) are not applied.
/// \code auto ram = distorch::host_memory(); \endcode
inline std::optional<memory_figures> host_memory() {
  std::ifstream in("/proc/meminfo");
  if (!in) return std::nullopt;
  std::ostringstream text;
  text << in.rdbuf();
  return parse_meminfo(text.str());
}

namespace detail {

/// The handful of CUDA runtime entry points distorch needs, resolved once at run time.
struct cuda_runtime_api {
  using get_count_fn = int (*)(int*);
  using get_device_fn = int (*)(int*);
  using set_device_fn = int (*)(int);
  using mem_get_info_fn = int (*)(std::size_t*, std::size_t*);
  using get_properties_fn = int (*)(void*, int);

  void* handle = nullptr;
  get_count_fn get_count = nullptr;
  get_device_fn get_device = nullptr;
  set_device_fn set_device = nullptr;
  mem_get_info_fn mem_get_info = nullptr;
  get_properties_fn get_properties = nullptr;

  bool usable() const noexcept { return get_count && get_device && set_device && mem_get_info; }
};

/// Path of an already loaded libcudart, if the process has one (LibTorch built with CUDA loads it).
inline std::string loaded_cudart_path() {
  std::string found;
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* out) -> int {
        if (info->dlpi_name && std::strstr(info->dlpi_name, "libcudart") != nullptr) {
          *static_cast<std::string*>(out) = info->dlpi_name;
          return 1;
        }
        return 0;
      },
      &found);
  return found;
}

inline cuda_runtime_api load_cuda_runtime() {
  cuda_runtime_api api;
  // Prefer the runtime LibTorch already uses: a second, different runtime would own other contexts.
  const std::string loaded = loaded_cudart_path();
  if (!loaded.empty()) api.handle = dlopen(loaded.c_str(), RTLD_LAZY | RTLD_NOLOAD);
  static constexpr std::array<const char*, 5> sonames{"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                                                      "libcudart.so.10.2", "libcudart.so"};
  for (const char* name : sonames)
    if (!api.handle) api.handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
  for (const char* name : sonames)
    if (!api.handle) api.handle = dlopen(name, RTLD_LAZY | RTLD_LOCAL);
  if (!api.handle) return api;
  api.get_count = reinterpret_cast<cuda_runtime_api::get_count_fn>(dlsym(api.handle, "cudaGetDeviceCount"));
  api.get_device = reinterpret_cast<cuda_runtime_api::get_device_fn>(dlsym(api.handle, "cudaGetDevice"));
  api.set_device = reinterpret_cast<cuda_runtime_api::set_device_fn>(dlsym(api.handle, "cudaSetDevice"));
  api.mem_get_info = reinterpret_cast<cuda_runtime_api::mem_get_info_fn>(dlsym(api.handle, "cudaMemGetInfo"));
  // CUDA 12 renamed the entry point behind the cudaGetDeviceProperties macro to _v2.
  api.get_properties = reinterpret_cast<cuda_runtime_api::get_properties_fn>(dlsym(api.handle, "cudaGetDeviceProperties_v2"));
  if (!api.get_properties)
    api.get_properties = reinterpret_cast<cuda_runtime_api::get_properties_fn>(dlsym(api.handle, "cudaGetDeviceProperties"));
  return api;
}

inline const cuda_runtime_api& cuda_runtime() {
  static const cuda_runtime_api api = load_cuda_runtime();  // thread-safe one-time lookup
  return api;
}

/// Runs `body` with `index` as the calling thread's current CUDA device, then restores the previous one.
template <class Body>
bool with_cuda_device(const cuda_runtime_api& api, int index, Body&& body) {
  int previous = 0;
  if (api.get_device(&previous) != 0) return false;
  if (api.set_device(index) != 0) return false;
  const bool ok = body();
  api.set_device(previous);
  return ok;
}

}  // namespace detail

/// Whether a CUDA runtime library could be found in this process.
/// \code if (distorch::cuda_runtime_available()) { ... } \endcode
inline bool cuda_runtime_available() { return detail::cuda_runtime().usable(); }

/// Number of CUDA devices the CUDA runtime sees; 0 without a runtime or a driver.
/// \code int n = distorch::cuda_runtime_device_count(); \endcode
inline int cuda_runtime_device_count() {
  const auto& api = detail::cuda_runtime();
  if (!api.usable()) return 0;
  int count = 0;
  return api.get_count(&count) == 0 ? count : 0;
}

/// Total and free bytes of CUDA device `index` (cudaMemGetInfo), or nullopt without a runtime,
/// driver or such device. Like `torch.cuda.mem_get_info`, this creates the device's primary
/// context if it does not exist yet.
/// \code if (auto m = distorch::cuda_memory(0)) plan_with(m->free); \endcode
inline std::optional<memory_figures> cuda_memory(int index) {
  const auto& api = detail::cuda_runtime();
  if (!api.usable() || index < 0 || index >= cuda_runtime_device_count()) return std::nullopt;
  std::size_t free = 0, total = 0;
  if (!detail::with_cuda_device(api, index, [&] { return api.mem_get_info(&free, &total) == 0; })) return std::nullopt;
  return memory_figures{total, free};
}

/// Marketing name of CUDA device `index` ("NVIDIA H100 80GB HBM3"), or nullopt.
/// \code std::string name = distorch::cuda_device_name(0).value_or("cuda"); \endcode
inline std::optional<std::string> cuda_device_name(int index) {
  const auto& api = detail::cuda_runtime();
  if (!api.usable() || !api.get_properties || index < 0 || index >= cuda_runtime_device_count()) return std::nullopt;
  // cudaDeviceProp grows with every CUDA release, but `char name[256]` has always been its first
  // member; a buffer far larger than any released layout keeps the runtime's write in bounds.
  std::vector<char> properties(64 * 1024, '\0');
  if (api.get_properties(properties.data(), index) != 0) return std::nullopt;
  return std::string(properties.data(), strnlen(properties.data(), 256));
}

}  // namespace distorch::inline v0
