#pragma once
/// \file
/// LibTorch's CUDA caching allocator, reached only where it can be: its statistics (allocated and
/// reserved bytes) and its cache release. The CUDA headers are included only when the build
/// defines `DISTORCH_WITH_CUDA` (distorch's meson.build does so when it finds libtorch_cuda and the
/// CUDA runtime headers); otherwise the statistics are unknown and the cache release falls back to
/// the exported `c10::cuda::CUDACachingAllocator::emptyCache()` of LibTorch 1.x, looked up at run
/// time. (LibTorch 2.x made that function inline, so a 2.x build without `DISTORCH_WITH_CUDA`
/// cannot release the CUDA cache and says so by returning false.)
///
/// Example:
/// \code
///   if (auto s = distorch::cuda_allocator_stats(0)) std::cout << s->allocated << " / " << s->reserved << '\n';
///   bool released = distorch::cuda_empty_cache();
/// \endcode

#include <dlfcn.h>

#include <cstdint>
#include <optional>

#include "distorch/device/discover.hpp"

#include <torch/csrc/api/include/torch/version.h>

// LibTorch 2.8 and later reach the caching host allocator (pinned memory) through
// at::getHostAllocator; earlier ones through at::cuda::CachingHostAllocator_*.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define DISTORCH_TORCH_HOST_ALLOCATOR 1
#else
#define DISTORCH_TORCH_HOST_ALLOCATOR 0
#endif

#if defined(DISTORCH_WITH_CUDA)
#include <ATen/Context.h>
#include <c10/cuda/CUDACachingAllocator.h>
#if DISTORCH_TORCH_HOST_ALLOCATOR
#include <ATen/core/CachingHostAllocator.h>
#else
#include <ATen/cuda/CachingHostAllocator.h>
#endif
#endif

namespace distorch::inline v0 {

/// What LibTorch's allocator reports for one device, in bytes.
struct torch_allocator_stats {
  std::uint64_t allocated = 0;  ///< held by live tensors
  std::uint64_t reserved = 0;   ///< held by the caching allocator (allocated + cached)
  friend bool operator==(const torch_allocator_stats&, const torch_allocator_stats&) = default;
};

/// Whether this build can read the CUDA caching allocator's statistics.
/// \code if (distorch::cuda_allocator_stats_supported()) { ... } \endcode
constexpr bool cuda_allocator_stats_supported() noexcept {
#if defined(DISTORCH_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

#if defined(DISTORCH_WITH_CUDA)
namespace detail {
/// Initialises LibTorch's CUDA state (and with it the caching allocator) once: asking the
/// allocator before the first CUDA allocation otherwise throws "did you call init?". The
/// initialiser is `lazyInitDevice(kCUDA)` in LibTorch 2.x, `lazyInitCUDA()` before.
template <class Context>
void lazy_init_cuda(Context& context) {
  if constexpr (requires { context.lazyInitDevice(c10::DeviceType::CUDA); })
    context.lazyInitDevice(c10::DeviceType::CUDA);
  else
    context.lazyInitCUDA();
}
}  // namespace detail
#endif

/// Allocated and reserved bytes of CUDA device `index`, or nullopt where this build cannot ask or
/// the device does not exist. Safe before any CUDA allocation (it initialises CUDA first).
/// \code auto s = distorch::cuda_allocator_stats(0); \endcode
inline std::optional<torch_allocator_stats> cuda_allocator_stats(int index) {
  if (index < 0 || index >= torch_device_count(c10::DeviceType::CUDA)) return std::nullopt;
#if defined(DISTORCH_WITH_CUDA)
  detail::lazy_init_cuda(at::globalContext());
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(index));
  // Index 0 is StatType::AGGREGATE in every LibTorch version; the enum moved namespaces in 2.x.
  return torch_allocator_stats{static_cast<std::uint64_t>(stats.allocated_bytes[0].current),
                               static_cast<std::uint64_t>(stats.reserved_bytes[0].current)};
#else
  return std::nullopt;
#endif
}

/// Releases the cached, unused blocks of LibTorch's CUDA allocator on every CUDA device. True when
/// a release was made; false when there is no CUDA device or this build cannot reach the allocator.
/// \code distorch::cuda_empty_cache(); \endcode
inline bool cuda_empty_cache() {
  if (torch_device_count(c10::DeviceType::CUDA) == 0) return false;
#if defined(DISTORCH_WITH_CUDA)
  detail::lazy_init_cuda(at::globalContext());
  c10::cuda::CUDACachingAllocator::emptyCache();
  return true;
#else
  using empty_cache_fn = void (*)();
  static const auto fn = reinterpret_cast<empty_cache_fn>(dlsym(RTLD_DEFAULT, "_ZN3c104cuda20CUDACachingAllocator10emptyCacheEv"));
  if (!fn) return false;
  fn();
  return true;
#endif
}

/// Pinned host memory as LibTorch's caching host allocator reports it: `allocated` = bytes of
/// blocks in use, `reserved` = bytes it holds page-locked (in use + cached). Nullopt without a CUDA
/// device, without `DISTORCH_WITH_CUDA`, or before LibTorch 2.8.
/// \code if (auto s = distorch::cuda_host_allocator_stats()) std::cout << s->allocated << '\n'; \endcode
inline std::optional<torch_allocator_stats> cuda_host_allocator_stats() {
  if (torch_device_count(c10::DeviceType::CUDA) == 0) return std::nullopt;
#if defined(DISTORCH_WITH_CUDA) && DISTORCH_TORCH_HOST_ALLOCATOR
  const auto stats = at::getHostAllocator(c10::DeviceType::CUDA)->get_stats();
  return torch_allocator_stats{static_cast<std::uint64_t>(stats.active_bytes.current),
                               static_cast<std::uint64_t>(stats.allocated_bytes.current)};
#else
  return std::nullopt;
#endif
}

/// Gives the page-locked host blocks LibTorch's caching host allocator keeps for reuse back to the
/// OS. True when a release was made; false without a CUDA device or without `DISTORCH_WITH_CUDA`.
/// \code distorch::cuda_empty_host_cache(); \endcode
inline bool cuda_empty_host_cache() {
  if (torch_device_count(c10::DeviceType::CUDA) == 0) return false;
#if defined(DISTORCH_WITH_CUDA)
#if DISTORCH_TORCH_HOST_ALLOCATOR
  at::getHostAllocator(c10::DeviceType::CUDA)->empty_cache();
#else
  at::cuda::CachingHostAllocator_emptyCache();
#endif
  return true;
#else
  return false;
#endif
}

}  // namespace distorch::inline v0
