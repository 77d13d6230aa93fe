#pragma once
/// \file
/// Forward declarations of distorch's main non-template types, for headers that only pass them
/// by reference or pointer. Templates with constrained parameters (`DistributedModule`,
/// `planner`) are not declared here: their constraints need the concept headers.
///
/// Example:
/// \code
///   #include <distorch/fwd.hpp>
///   void report(const distorch::placement_plan& plan, const distorch::streaming_stats& stats);
/// \endcode

namespace distorch::inline v0 {

class error;
struct device_id;
struct device_info;
struct topology;
class byte_budget;
class reservation;
class simulated_device;
class real_device;
struct tensor_record;
struct unit;
class inventory;
struct placement_plan;
class weight_source;
class device_pool;
struct streaming_options;
struct streaming_stats;
class residency_manager;
struct distribute_spec;
class model_registry;

namespace nn {
class streamed_module;
}  // namespace nn

}  // namespace distorch::inline v0
