#pragma once
/// \file
/// The umbrella header: everything distorch offers. Convenient for applications; libraries and
/// large programs should include the narrow headers they use (LibTorch headers dominate compile
/// time, and this pulls in every LibTorch layer header the `distorch::nn` aliases need).
///
/// Example:
/// \code
///   #include <distorch/distorch.hpp>
///   distorch::DistributedModule dm(model, pool, distorch::policy_from_string("cuda:0,8gb;cpu,*"), spec);
/// \endcode

#include "distorch/fwd.hpp"

#include "distorch/core/bytes.hpp"
#include "distorch/core/config.hpp"
#include "distorch/core/error.hpp"
#include "distorch/core/log.hpp"
#include "distorch/core/progress.hpp"
#include "distorch/core/regex_prefilter.hpp"

#include "distorch/device/byte_budget.hpp"
#include "distorch/device/device.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/device/discover.hpp"
#include "distorch/device/empty_caches.hpp"
#include "distorch/device/memory_info.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/device/torch_device.hpp"

#include "distorch/memory/snapshot.hpp"

#include "distorch/model/dtype.hpp"
#include "distorch/model/inventory.hpp"

#include "distorch/placement/any_policy.hpp"
#include "distorch/placement/grammar.hpp"
#include "distorch/placement/plan.hpp"
#include "distorch/placement/plan_io.hpp"
#include "distorch/placement/planner.hpp"
#include "distorch/placement/policies.hpp"
#include "distorch/placement/policy.hpp"

#include "distorch/io/file_inventory.hpp"
#include "distorch/io/open.hpp"
#include "distorch/io/torch_tensor.hpp"
#include "distorch/io/weight_source.hpp"

#include "distorch/profile/predictor.hpp"
#include "distorch/profile/profile.hpp"
#include "distorch/profile/profiler.hpp"
#include "distorch/profile/suggest.hpp"
#include "distorch/runtime/device_pool.hpp"
#include "distorch/runtime/distributed_module.hpp"
#include "distorch/runtime/host_staging.hpp"
#include "distorch/runtime/layers.hpp"
#include "distorch/runtime/module_units.hpp"
#include "distorch/runtime/registry.hpp"
#include "distorch/runtime/residency.hpp"
#include "distorch/runtime/staging_ring.hpp"
#include "distorch/runtime/streamed.hpp"
#include "distorch/runtime/streamed_view.hpp"
#include "distorch/runtime/streaming_stats.hpp"
#include "distorch/runtime/unit_allocator.hpp"
