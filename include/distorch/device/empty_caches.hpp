#pragma once
/// \file
/// `empty_caches()`: give cached memory back on every device. LibTorch's caching allocators keep
/// freed blocks for reuse, and glibc keeps freed heap pages; after unloading a model neither is
/// visible to other processes (or to `nvidia-smi`) until released. This releases the CUDA caching
/// allocator's unused blocks and the pinned host blocks its caching host allocator keeps
/// (device/cuda_caching_allocator.hpp), and trims host RAM with
/// `malloc_trim(0)`. Tensors in use are never touched.
///
/// Example:
/// \code
///   auto report = distorch::empty_caches();
///   for (auto id : report.cleared) std::cout << "released cache on " << id.str() << '\n';
/// \endcode

#include <cstdlib>  // defines __GLIBC__ on glibc systems, before it is tested below
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "distorch/device/cuda_caching_allocator.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/device/discover.hpp"

namespace distorch::inline v0 {

/// What `empty_caches()` did.
struct cache_release_report {
  std::vector<device_id> cleared;  ///< devices whose allocator cache was released
  bool host_trimmed = false;       ///< malloc_trim returned memory to the OS
  bool pinned_released = false;    ///< the caching host allocator's unused pinned blocks were unpinned and freed
};

/// Releases allocator caches on every device and trims host RAM.
/// \code
///   registry.unload_all();
///   distorch::empty_caches();
/// \endcode
inline cache_release_report empty_caches() {
  cache_release_report report;
  if (cuda_empty_cache()) {
    const int n = torch_device_count(c10::DeviceType::CUDA);
    for (int i = 0; i < n; ++i) report.cleared.push_back(device_id::cuda(i));
  }
  report.pinned_released = cuda_empty_host_cache();
#if defined(__GLIBC__)
  report.host_trimmed = malloc_trim(0) == 1;
#endif
  return report;
}

}  // namespace distorch::inline v0
