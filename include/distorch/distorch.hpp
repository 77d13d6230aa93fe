#pragma once
/// \file
/// The umbrella header: everything distorch offers, that is every public header (all of
/// include/distorch but the detail/ folders; tests/odr/check_umbrella.py fails when one is missing
/// here). Convenient for applications; libraries and large programs should include the narrow
/// headers they use (LibTorch headers dominate compile time, and this pulls in every LibTorch
/// layer header the `distorch::nn` aliases need).
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
#include "distorch/core/json_file.hpp"
#include "distorch/core/log.hpp"
#include "distorch/core/progress.hpp"
#include "distorch/core/regex_prefilter.hpp"
#include "distorch/core/user_regex.hpp"

#include "distorch/device/byte_budget.hpp"
#include "distorch/device/cuda_caching_allocator.hpp"
#include "distorch/device/device.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/device/discover.hpp"
#include "distorch/device/empty_caches.hpp"
#include "distorch/device/memory_info.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/device/torch_device.hpp"

#include "distorch/io/file_inventory.hpp"
#include "distorch/io/ggml_dequant.hpp"
#include "distorch/io/ggml_types.hpp"
#include "distorch/io/gguf.hpp"
#include "distorch/io/gguf_source.hpp"
#include "distorch/io/mapped_file.hpp"
#include "distorch/io/open.hpp"
#include "distorch/io/pickle.hpp"
#include "distorch/io/safetensors.hpp"
#include "distorch/io/safetensors_index.hpp"
#include "distorch/io/safetensors_source.hpp"
#include "distorch/io/safetensors_writer.hpp"
#include "distorch/io/state_dict.hpp"
#include "distorch/io/torch_tensor.hpp"
#include "distorch/io/torch_zip.hpp"
#include "distorch/io/torch_zip_source.hpp"
#include "distorch/io/weight_source.hpp"

#include "distorch/lora/adapter.hpp"
#include "distorch/lora/adapter_keys.hpp"
#include "distorch/lora/binding.hpp"
#include "distorch/lora/key_map.hpp"
#include "distorch/lora/load_adapter.hpp"
#include "distorch/lora/merge.hpp"
#include "distorch/lora/merge_file.hpp"
#include "distorch/lora/patcher.hpp"
#include "distorch/lora/peft_config.hpp"

#include "distorch/memory/accounting_allocator.hpp"
#include "distorch/memory/allocator.hpp"
#include "distorch/memory/memory_space_access.hpp"
#include "distorch/memory/pinned_host_allocator.hpp"
#include "distorch/memory/snapshot.hpp"

#include "distorch/model/dtype.hpp"
#include "distorch/model/inventory.hpp"
#include "distorch/model/module_inventory.hpp"
#include "distorch/model/torch_dtype.hpp"

#include "distorch/placement/any_policy.hpp"
#include "distorch/placement/grammar.hpp"
#include "distorch/placement/overrides.hpp"
#include "distorch/placement/plan.hpp"
#include "distorch/placement/plan_io.hpp"
#include "distorch/placement/planner.hpp"
#include "distorch/placement/policies.hpp"
#include "distorch/placement/policy.hpp"
#include "distorch/placement/units_file.hpp"

#include "distorch/profile/predictor.hpp"
#include "distorch/profile/profile.hpp"
#include "distorch/profile/profiler.hpp"
#include "distorch/profile/suggest.hpp"

#include "distorch/runtime/demo.hpp"
#include "distorch/runtime/device_pool.hpp"
#include "distorch/runtime/distributed_module.hpp"
#include "distorch/runtime/host_staging.hpp"
#include "distorch/runtime/layers.hpp"
#include "distorch/runtime/module_units.hpp"
#include "distorch/runtime/registry.hpp"
#include "distorch/runtime/residency.hpp"
#include "distorch/runtime/staging_ring.hpp"
#include "distorch/runtime/storage_dtype.hpp"
#include "distorch/runtime/streamed.hpp"
#include "distorch/runtime/streamed_view.hpp"
#include "distorch/runtime/streaming_stats.hpp"
#include "distorch/runtime/unit_allocator.hpp"
