#pragma once
/// \file
/// `DistributedModule<Module, Policy, Allocator>`: owns a module and its placement. It plans where
/// every unit lives, runs Load-Patch-Distribute unit by unit, and drives residency during forward.
///
/// Load-Patch-Distribute, for each unit in model order:
/// 1. read its tensors (from the weight sources, zero-copy where the reader maps the file, or from
///    the module's own current tensors);
/// 2. copy them to the compute device (one unit in flight, booked there);
/// 3. patch them with the adapters that target them, in fp32, rounded once;
/// 4. copy them to the unit's home (or keep them there when the home is the compute device);
/// 5. drop the staging copy.
/// So the compute device holds at most its resident units + one unit + the patch scratch; the
/// whole model is never staged there. The load is a transaction: if any unit fails (allocation,
/// I/O, a bad adapter), every handle gets its original tensor back (the originals are never written,
/// so they are bit-identical) and every byte booked on the way is given back before the error
/// propagates.
///
/// Forward:
/// - `torch::nn::Sequential`: each child runs with its units staged, and the manager prefetches.
/// - any other module: units inside `distorch::nn::Streamed` layers stage themselves; streamed
///   units no such layer covers are staged around the whole call.
/// - a custom loop: `for (auto& block : *blocks | distorch::views::streamed(dm))`.
///
/// Template parameters (each defaulted): `Module` is the holder (`torch::nn::Sequential`, a
/// `TORCH_MODULE` holder, or `std::shared_ptr<Impl>`); `Policy` is a `placement_policy`
/// (`any_policy` accepts allocation strings); `Allocator` is a `unit_allocator`.
///
/// Example:
/// \code
///   distorch::device_pool pool;
///   pool.add(distorch::simulated_device(distorch::device_id::sim(0), 8ull << 20)).add_host();
///   distorch::distribute_spec spec{.compute = distorch::device_id::sim(0)};
///   distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,4mb;cpu,*"), spec);
///   at::Tensor y = dm.forward(x);
///   std::cout << distorch::plan_table(dm.plan()) << dm.stats().str() << '\n';
/// \endcode

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/io/weight_source.hpp"
#include "distorch/model/inventory.hpp"
#include "distorch/placement/any_policy.hpp"
#include "distorch/placement/plan.hpp"
#include "distorch/placement/planner.hpp"
#include "distorch/placement/policy.hpp"
#include "distorch/runtime/device_pool.hpp"
#include "distorch/runtime/low_rank.hpp"
#include "distorch/runtime/module_units.hpp"
#include "distorch/runtime/residency.hpp"
#include "distorch/runtime/streamed.hpp"
#include "distorch/runtime/streaming_stats.hpp"
#include "distorch/runtime/unit_allocator.hpp"

namespace distorch::inline v0 {

/// What to distribute and how, besides the module, the devices and the policy.
struct distribute_spec {
  /// The device forward runs on; must be in the pool.
  device_id compute = device_id::cpu();
  /// Weight files, searched in order for each tensor by its module name; empty = the module's own
  /// current tensors.
  std::vector<std::shared_ptr<const weight_source>> weights;
  /// Adapters merged during the load, with their strengths.
  low_rank_set adapters;
  /// Coarsens units, e.g. `{{R"(blocks\.\d+)"}}`: one unit per block.
  std::vector<grouping_rule> grouping;
  streaming_options streaming;
  /// Planner knobs; its prefetch depth is taken from `streaming` (+1 for the unit that runs).
  planner_options planning;
  /// With the module's own weights as source, keep every unit's unpatched tensors in host memory so
  /// `set_adapters` can re-merge any unit. Without it only units some adapter touched at load
  /// time keep theirs. File sources re-read unpatched tensors from the file instead.
  bool keep_unpatched = false;
};

/// Bytes per device as the pool books them.
struct device_usage {
  device_id device;
  std::uint64_t used = 0;
  std::uint64_t capacity = 0;
  std::uint64_t peak = 0;
};

namespace detail {

template <class M>
torch::nn::Module& module_of(M& m) {
  if constexpr (requires { m.ptr(); }) return *m.ptr();
  else return *m;
}

template <class M>
inline constexpr bool is_sequential_v = std::is_same_v<std::remove_cvref_t<M>, torch::nn::Sequential>;

}  // namespace detail

/// See the file comment.
template <class Module, placement_policy Policy = any_policy, unit_allocator Allocator = booked_copy_allocator>
class DistributedModule {
 public:
  /// Plans with `policy` over the pool's devices and loads.
  /// \code distorch::DistributedModule dm(seq, pool, distorch::policy_from_string("sim:0,2mb;cpu,*"), spec); \endcode
  DistributedModule(Module module, device_pool pool, Policy policy, distribute_spec spec, Allocator allocator = {})
      : module_(std::move(module)), pool_(std::move(pool)), policy_(std::move(policy)), spec_(std::move(spec)),
        allocator_(std::move(allocator)) {
    bind();
    plan_ = make_plan_for(policy_, pool_.topo());
    load();
  }

  /// Loads by a plan made elsewhere (e.g. read from JSON); its units must be the module's units.
  /// \code distorch::DistributedModule<torch::nn::Sequential> dm(seq, pool, plan, spec); \endcode
  DistributedModule(Module module, device_pool pool, placement_plan plan, distribute_spec spec, Allocator allocator = {})
      : module_(std::move(module)), pool_(std::move(pool)), spec_(std::move(spec)), allocator_(std::move(allocator)) {
    bind();
    plan_ = aligned(std::move(plan));
    load();
  }

  DistributedModule(const DistributedModule&) = delete;
  DistributedModule& operator=(const DistributedModule&) = delete;

  ~DistributedModule() {
    for (auto* s : streamed_) s->detach_residency();
  }

  /// Runs the module. See the file comment for how each kind of module streams.
  /// \code at::Tensor y = dm.forward(x); \endcode
  template <class... Args>
  decltype(auto) forward(Args&&... args) {
    if (!loaded_) reload();
    if constexpr (detail::is_sequential_v<Module> && sizeof...(Args) == 1) {
      at::Tensor x(std::forward<Args>(args)...);
      std::size_t k = 0;
      for (auto& child : *module_) {
        unit_scope scope(*manager_, sequential_units_.at(k++));
        x = child.template forward<at::Tensor>(x);
      }
      return x;
    } else {
      unit_scope scope(*manager_, uncovered_);
      return module_->forward(std::forward<Args>(args)...);
    }
  }

  Module& module() noexcept { return module_; }
  const placement_plan& plan() const noexcept { return plan_; }
  const inventory& units() const noexcept { return bound_.units; }
  const device_pool& pool() const noexcept { return pool_; }
  const distribute_spec& spec() const noexcept { return spec_; }
  residency_manager& residency() noexcept { return *manager_; }
  const residency_manager& residency() const noexcept { return *manager_; }

  streaming_stats stats() const { return manager_->stats(); }
  void reset_stats() { manager_->reset_stats(); }

  /// Bytes booked on every pool device now (this model and anything else sharing the pool).
  std::vector<device_usage> memory() const {
    std::vector<device_usage> out;
    for (const auto& d : pool_.devices()) out.push_back({d.id, d.budget->used(), d.budget->capacity(), d.budget->peak()});
    return out;
  }

  /// Indices of the units inside a submodule of this model (by identity), for custom loops.
  /// \code auto ids = dm.units_of(*blocks[2]); \endcode
  std::vector<std::size_t> units_of(const torch::nn::Module& submodule) const {
    auto it = paths_.find(&submodule);
    if (it == paths_.end())
      throw placement_error({"looking up a submodule", submodule.name(), std::nullopt,
                             "the module is not part of this distributed model", "pass a submodule of the model given to DistributedModule"});
    return bound_.units_under(it->second);
  }

  /// Moves units to the plan `policy` makes now, without reloading. Transactional: on failure no
  /// unit has moved and nothing stays booked.
  /// \code dm.replan(distorch::policy_from_string("sim:0,8mb;cpu,*")); \endcode
  template <placement_policy P>
  void replan(const P& policy) {
    rehome(make_plan_for(policy, topology_without_self()));
  }

  /// Moves units to a given plan, without reloading.
  void replan(const placement_plan& plan) { rehome(aligned(plan)); }

  /// Changes adapter strengths and re-merges only the units those adapters touch.
  /// \code dm.set_strengths({{"style", 0.5}}); \endcode
  void set_strengths(const std::map<std::string, double>& strengths) {
    low_rank_set next = spec_.adapters;
    std::vector<std::string> changed;
    for (const auto& [name, s] : strengths) {
      if (next.strength(name) == s) continue;
      next.set_strength(name, s);
      changed.push_back(name);
    }
    std::vector<bool> touched(bound_.units.size(), false);
    for (std::size_t i = 0; i < touched.size(); ++i)
      for (const auto& n : bound_.names[i])
        for (const auto& a : changed)
          if (next.touches(a, n)) touched[i] = true;
    remerge(std::move(next), touched);
  }

  /// Replaces the adapter set and re-merges only the units touched by the old or the new set.
  void set_adapters(low_rank_set adapters) {
    std::vector<bool> touched(bound_.units.size(), false);
    for (std::size_t i = 0; i < touched.size(); ++i)
      for (const auto& n : bound_.names[i])
        if (spec_.adapters.touches(n) || adapters.touches(n)) touched[i] = true;
    remerge(std::move(adapters), touched);
  }

  /// Sends every unit to host memory (`cpu`), giving back everything the model holds on other
  /// devices; the plan it was loaded with is kept for `reload()`. A forward reloads by itself.
  /// Needs `cpu` in the pool. Nothing happens when the model is already unloaded.
  /// \code registry.unload_all();   // calls dm.unload() for every model not kept \endcode
  void unload() {
    if (!loaded_) return;
    placement_plan host = plan_;
    for (auto& u : host.units) u.device = device_id::cpu();
    pool_.at(device_id::cpu());
    const placement_plan loaded_plan = plan_;
    rehome(host);
    loaded_plan_ = loaded_plan;
    loaded_ = false;
  }

  /// Moves every unit back to the plan it was loaded with (no file is read).
  void reload() {
    if (loaded_) return;
    rehome(loaded_plan_);
    loaded_ = true;
  }

  bool loaded() const noexcept { return loaded_; }

  /// Units re-merged by the last `set_strengths` / `set_adapters`.
  const std::vector<std::size_t>& last_remerged() const noexcept { return last_remerged_; }

  /// Identity of every tensor the model holds now: (name, device, data pointer). The registry's
  /// retention check compares these before and after a free.
  std::vector<std::tuple<std::string, device_id, const void*>> fingerprint() const {
    std::vector<std::tuple<std::string, device_id, const void*>> out;
    for (std::size_t i = 0; i < manager_->size(); ++i) {
      const auto& u = manager_->unit(i);
      for (std::size_t t = 0; t < u.handles.size(); ++t)
        out.emplace_back(bound_.names[i][t], u.home, u.handles[t].defined() ? u.handles[t].data_ptr() : nullptr);
    }
    return out;
  }

 private:
  // Enters a list of units for one scope; leaves them (in reverse) at its end, also on exceptions.
  class unit_scope {
   public:
    unit_scope(residency_manager& m, const std::vector<std::size_t>& units) : m_(m), units_(units) {
      for (; entered_ < units_.size(); ++entered_) m_.enter(units_[entered_]);
    }
    ~unit_scope() {
      while (entered_ > 0) m_.leave(units_[--entered_]);
    }
    unit_scope(const unit_scope&) = delete;
    unit_scope& operator=(const unit_scope&) = delete;

   private:
    residency_manager& m_;
    const std::vector<std::size_t>& units_;
    std::size_t entered_ = 0;
  };

  torch::nn::Module& root() { return detail::module_of(module_); }

  void bind() {
    if (!pool_.contains(spec_.compute))
      throw placement_error({"distributing a module", spec_.compute.str(), std::nullopt,
                             "the compute device is not in the device pool (" + pool_.names() + ")",
                             "add the compute device to the pool"});
    bound_ = bind_units(root(), spec_.grouping);
    for (const auto& item : root().named_modules("", true)) paths_.emplace(item.value().get(), item.key());
    if constexpr (detail::is_sequential_v<Module>) {
      const auto children = root().named_children();
      for (const auto& c : children) sequential_units_.push_back(bound_.units_under(c.key()));
    }
    if (!spec_.weights.empty()) check_sources();
  }

  // Every tensor must be found in a source with its shape and dtype, before anything moves.
  void check_sources() const {
    for (std::size_t i = 0; i < bound_.handles.size(); ++i)
      for (std::size_t t = 0; t < bound_.handles[i].size(); ++t) {
        const auto& name = bound_.names[i][t];
        const tensor_record* found = nullptr;
        for (const auto& src : spec_.weights) {
          for (const auto& r : src->records())
            if (r.name == name) found = &r;
          if (found) break;
        }
        const auto& h = bound_.handles[i][t];
        if (!found)
          throw format_error({"matching weight files to the module", name, std::nullopt, "no weight file has this tensor",
                              "pass the weight files that hold every parameter and buffer of the model"});
        if (found->shape != std::vector<std::int64_t>(h.sizes().begin(), h.sizes().end()))
          throw format_error({"matching weight files to the module", name, std::nullopt,
                              "the file's shape differs from the module's", "load weights made for this model"});
      }
  }

  // A plan made elsewhere (from file headers, say) may list units in another order: it is put in
  // the module's order, and every unit must be there exactly once.
  placement_plan aligned(placement_plan plan) const {
    if (plan.compute != spec_.compute)
      throw placement_error({"using a given plan", plan.compute.str(), std::nullopt,
                             "the plan computes on " + plan.compute.str() + ", the spec on " + spec_.compute.str(),
                             "use the same compute device"});
    if (plan.units.size() != bound_.units.size())
      throw placement_error({"using a given plan", plan.policy, std::nullopt,
                             "the plan has " + std::to_string(plan.units.size()) + " units, the module " +
                                 std::to_string(bound_.units.size()),
                             "plan with this module's inventory and grouping"});
    std::unordered_map<std::string, const unit_placement*> by_name;
    for (const auto& u : plan.units) by_name.emplace(u.unit, &u);
    std::vector<unit_placement> ordered;
    for (std::size_t i = 0; i < bound_.units.size(); ++i) {
      const auto& name = bound_.units.units()[i].name;
      auto it = by_name.find(name);
      if (it == by_name.end())
        throw placement_error({"using a given plan", name, error_position{"unit", i}, "the module's unit is not in the plan",
                               "plan with this module's inventory and grouping"});
      pool_.at(it->second->device);
      ordered.push_back(*it->second);
    }
    plan.units = std::move(ordered);
    return plan;
  }

  template <placement_policy P>
  placement_plan make_plan_for(const P& policy, const topology& topo) const {
    planner_options options = spec_.planning;
    // The planner keeps largest unit × depth free on the compute device; the runtime also needs
    // room for the unit that runs (and for the one unit in flight while loading).
    options.prefetch_depth = spec_.streaming.prefetch_depth + 1;
    return make_plan(bound_.units, topo, spec_.compute, policy, options);
  }

  // The pool's devices as if this model held nothing: what a new plan may use.
  topology topology_without_self() const {
    topology t = pool_.topo();
    for (const auto& u : manager_->units())
      for (auto& d : t.devices)
        if (d.id == u.home)
          for (const auto& h : u.home_data) d.free_bytes += h.booked.bytes();
    return t;
  }

  const pool_device& device_of(const device_id& id) const { return pool_.at(id); }

  bool pin_for(const device_id& home) const {
    const auto& target = device_of(spec_.compute);
    return spec_.streaming.pinned_host && home.is_cpu() && target.torch_device.type() == c10::DeviceType::CUDA;
  }

  at::Tensor unpatched_source(std::size_t unit, std::size_t t, const std::vector<std::vector<at::Tensor>>& originals) const {
    if (spec_.weights.empty()) return originals[unit][t];
    const auto& name = bound_.names[unit][t];
    for (const auto& src : spec_.weights)
      if (src->contains(name)) return src->load(name);
    throw format_error({"reading weights", name, std::nullopt, "no weight file has this tensor", "pass the right weight files"});
  }

  // Load-Patch-Distribute one unit: stage on compute, patch, place at home. Returns the home copies.
  std::vector<held_tensor> load_unit(std::size_t i, const device_id& home, const low_rank_set& adapters,
                                     const std::vector<std::vector<at::Tensor>>& originals) const {
    const auto& name = bound_.units.units()[i].name;
    const auto& compute = device_of(spec_.compute);
    const auto& target = device_of(home);
    std::vector<held_tensor> placed;
    for (std::size_t t = 0; t < bound_.handles[i].size(); ++t) {
      at::Tensor source = unpatched_source(i, t, originals);
      const auto& tensor_name = bound_.names[i][t];
      if (source.scalar_type() != bound_.handles[i][t].scalar_type())
        throw format_error({"loading unit '" + name + "'", tensor_name, std::nullopt,
                            "stored as " + std::string(c10::toString(source.scalar_type())) + ", the module holds " +
                                std::string(c10::toString(bound_.handles[i][t].scalar_type())),
                            "load weights stored in the model's dtypes"});
      held_tensor staged = allocator_.copy_to(source, pool_, compute, {false, false, "staging unit '" + name + "'"});
      if (adapters.touches(tensor_name)) {
        at::Tensor merged = adapters.patch(tensor_name, staged.data);
        staged.data.copy_(merged);
      }
      if (home == spec_.compute) {
        placed.push_back(std::move(staged));
      } else {
        placed.push_back(allocator_.copy_to(staged.data, pool_, target, {pin_for(home), false, "placing unit '" + name + "'"}));
      }  // the staging copy is dropped here
    }
    return placed;
  }

  void load() {
    std::vector<std::vector<at::Tensor>> originals;
    for (const auto& hs : bound_.handles) {
      std::vector<at::Tensor> o;
      for (const auto& h : hs) o.push_back(h.data());
      originals.push_back(std::move(o));
    }
    std::vector<residency_unit> units;
    units.reserve(bound_.units.size());
    try {
      for (std::size_t i = 0; i < bound_.units.size(); ++i) {
        const device_id home = plan_.units[i].device;
        auto placed = load_unit(i, home, spec_.adapters, originals);
        for (std::size_t t = 0; t < placed.size(); ++t) bound_.handles[i][t].set_data(placed[t].data);
        units.push_back({bound_.units.units()[i].name, home, bound_.units.units()[i].bytes, bound_.handles[i], std::move(placed)});
      }
    } catch (...) {
      for (std::size_t i = 0; i < bound_.handles.size(); ++i)
        for (std::size_t t = 0; t < bound_.handles[i].size(); ++t) bound_.handles[i][t].set_data(originals[i][t]);
      throw;  // `units` (and every booking in it) is released on the way out
    }
    if (spec_.weights.empty()) {
      unpatched_.resize(bound_.handles.size());
      for (std::size_t i = 0; i < bound_.handles.size(); ++i) {
        bool keep = spec_.keep_unpatched;
        for (const auto& n : bound_.names[i]) keep = keep || spec_.adapters.touches(n);
        if (keep) unpatched_[i] = originals[i];
      }
    }
    install(std::move(units));
  }

  void install(std::vector<residency_unit> units) {
    for (auto* s : streamed_) s->detach_residency();
    streamed_.clear();
    manager_ = std::make_shared<residency_manager>(pool_, spec_.compute, std::move(units), spec_.streaming,
                                                   [alloc = allocator_, pool = pool_](const at::Tensor& t, const pool_device& d,
                                                                                      const copy_request& r) {
                                                     return alloc.copy_to(t, pool, d, r);
                                                   });
    std::vector<bool> covered(bound_.units.size(), false);
    for (const auto& item : root().named_modules("", true)) {
      auto* s = dynamic_cast<nn::streamed_module*>(item.value().get());
      if (!s) continue;
      auto ids = bound_.units_under(item.key());
      for (auto id : ids) covered[id] = true;
      s->attach_residency(manager_, std::move(ids));
      streamed_.push_back(s);
    }
    uncovered_.clear();
    for (std::size_t i = 0; i < covered.size(); ++i)
      if (!covered[i] && manager_->streams(i)) uncovered_.push_back(i);
    if constexpr (detail::is_sequential_v<Module>) uncovered_.clear();
  }

  // Moves every unit whose home changes; all new copies are made before any handle switches.
  void rehome(const placement_plan& next) {
    auto units = manager_->take_units();
    std::vector<std::vector<held_tensor>> fresh(units.size());
    try {
      for (std::size_t i = 0; i < units.size(); ++i) {
        const device_id home = next.units[i].device;
        if (home == units[i].home) continue;
        for (const auto& h : units[i].home_data)
          fresh[i].push_back(allocator_.copy_to(h.data, pool_, device_of(home),
                                                {pin_for(home), false, "moving unit '" + units[i].name + "' to " + home.str()}));
      }
    } catch (...) {
      fresh.clear();
      install(std::move(units));
      throw;
    }
    for (std::size_t i = 0; i < units.size(); ++i) {
      if (fresh[i].empty() && !units[i].home_data.empty()) continue;
      units[i].home = next.units[i].device;
      units[i].home_data = std::move(fresh[i]);
      for (std::size_t t = 0; t < units[i].handles.size(); ++t) units[i].handles[t].set_data(units[i].home_data[t].data);
    }
    plan_ = next;
    install(std::move(units));
  }

  void remerge(low_rank_set adapters, const std::vector<bool>& touched) {
    for (std::size_t i = 0; i < touched.size(); ++i)
      if (touched[i] && spec_.weights.empty() && unpatched_[i].empty())
        throw lora_error({"re-merging adapters", bound_.units.units()[i].name, error_position{"unit", i},
                          "the unit's unpatched weights were not kept", "construct with keep_unpatched = true or load from weight files"});
    auto units = manager_->take_units();
    std::vector<std::vector<held_tensor>> fresh(units.size());
    try {
      for (std::size_t i = 0; i < units.size(); ++i)
        if (touched[i]) fresh[i] = load_unit(i, units[i].home, adapters, unpatched_);
    } catch (...) {
      fresh.clear();
      install(std::move(units));
      throw;
    }
    last_remerged_.clear();
    for (std::size_t i = 0; i < units.size(); ++i) {
      if (!touched[i]) continue;
      units[i].home_data = std::move(fresh[i]);
      for (std::size_t t = 0; t < units[i].handles.size(); ++t) units[i].handles[t].set_data(units[i].home_data[t].data);
      last_remerged_.push_back(i);
    }
    spec_.adapters = std::move(adapters);
    install(std::move(units));
  }

  Module module_;
  device_pool pool_;
  Policy policy_{};
  distribute_spec spec_;
  Allocator allocator_;
  bound_module bound_;
  placement_plan plan_;
  std::shared_ptr<residency_manager> manager_;
  std::unordered_map<const torch::nn::Module*, std::string> paths_;
  std::vector<std::vector<std::size_t>> sequential_units_;
  std::vector<std::size_t> uncovered_;
  std::vector<nn::streamed_module*> streamed_;
  std::vector<std::vector<at::Tensor>> unpatched_;
  std::vector<std::size_t> last_remerged_;
  placement_plan loaded_plan_;
  bool loaded_ = true;
};

}  // namespace distorch::inline v0
