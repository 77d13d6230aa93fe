#pragma once
/// \file
/// `DistributedModule<Module, Policy, Allocator>`: owns a module and its placement. It plans where
/// every unit lives, runs Load-Patch-Distribute unit by unit, and drives residency during forward.
///
/// Load-Patch-Distribute, for each unit in model order:
/// 1. read its tensors (from the weight sources, zero-copy where the reader maps the file, or from
///    the module's own current tensors);
/// 2. copy the tensors an adapter patches, and those of units homed on the compute device, to the
///    compute device (one unit in flight, booked there); the others go straight to their home
///    (cast to the home's storage dtype where they are), never over the compute device's link;
/// 3. merge the adapters that target them (lora/: LoRA, LoHa, LoKr, DoRA, diff, diff_b,
///    set_weight) in float32 on the compute device, rounded once to the storage dtype;
/// 4. copy them to the unit's home (or keep them there when the home is the compute device);
/// 5. drop the staging copy.
/// So the compute device holds at most its resident units + one unit + the merge scratch; the
/// whole model is never staged there. The adapters are bound to the model's tensor names and
/// shapes before anything moves, so an adapter that does not fit fails first. The load is a
/// transaction: if any unit fails (allocation, I/O, a bad adapter), every handle gets its original
/// tensor back (the originals are never written, so they are bit-identical) and every byte booked
/// on the way is given back before the error propagates.
///
/// GGUF files with `keep_quantized`: a block-quantized tensor of a unit homed off the compute
/// device stays in its ggml encoding at home (the raw blocks, a fraction of the float32 bytes) and
/// is dequantized on the compute device after each fetch, so only the quantized bytes cross the
/// link. Units homed on the compute device, and tensors an adapter patches, are dequantized when
/// they load (a patched weight cannot be re-quantized exactly).
///
/// Storage dtypes (`distribute_spec::storage`, or the allocation string's `:dtype` suffixes): the
/// floating tensors of a unit homed on such a device are cast down on the compute device, after
/// step 3 (a patched weight is merged in float32 and rounded once, to the storage dtype), kept at
/// home in that dtype, and cast back to the module's dtype on the compute device after each fetch
/// (runtime/storage_dtype.hpp). The plan books the stored bytes at home; the compute device holds
/// the module's dtype while the unit runs. Between uses a parameter handle holds the stored tensor.
///
/// Forward:
/// - `torch::nn::Sequential`: each child runs with its units staged, and the manager prefetches.
/// - any other module: units inside `distorch::nn::Streamed` layers stage themselves; streamed
///   units no such layer covers (plain `torch::nn` layers) are staged around the whole call, which
///   is allowed only when they fit the compute device together with its resident units, window and
///   reserve (checked before loading: a `placement_error` naming the largest of them otherwise,
///   with a warning once when they fit); `distribute_spec::uncovered` turns this off for models
///   whose caller stages them.
/// - a custom loop: `for (auto& block : *blocks | distorch::views::streamed(dm))`, with
///   `auto s = dm.stage(*head);` for a module outside the loop.
/// - Concurrent forwards (several threads or streams) are allowed; `replan`, `unload`, `reload`
///   and the adapter setters are refused with a `placement_error` while one runs.
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
///   spec.adapters = {{std::make_shared<distorch::adapter>(distorch::load_adapter("style.safetensors")), 0.8}};
///   distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,4mb;cpu,*"), spec);
///   at::Tensor y = dm.forward(x);
///   std::cout << distorch::format_plan_table(dm.plan()) << dm.stats().str() << '\n';
/// \endcode

#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <regex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/core/log.hpp"
#include "distorch/core/progress.hpp"
#include "distorch/io/gguf_source.hpp"
#include "distorch/io/weight_source.hpp"
#include "distorch/lora/adapter.hpp"
#include "distorch/lora/binding.hpp"
#include "distorch/lora/merge.hpp"
#include "distorch/model/inventory.hpp"
#include "distorch/placement/any_policy.hpp"
#include "distorch/placement/plan.hpp"
#include "distorch/placement/planner.hpp"
#include "distorch/placement/policy.hpp"
#include "distorch/runtime/device_pool.hpp"
#include "distorch/runtime/host_staging.hpp"
#include "distorch/runtime/module_units.hpp"
#include "distorch/runtime/residency.hpp"
#include "distorch/runtime/storage_dtype.hpp"
#include "distorch/runtime/streamed.hpp"
#include "distorch/runtime/streaming_stats.hpp"
#include "distorch/runtime/unit_allocator.hpp"

namespace distorch::inline v0 {

/// Who stages streamed units that no `distorch::nn::Streamed` layer covers (their modules are
/// plain `torch::nn` layers, or parameters registered on a custom module).
/// \code spec.uncovered = distorch::uncovered_units::caller_stages;   // a views::streamed loop + dm.stage \endcode
enum class uncovered_units : std::uint8_t {
  /// `forward` stages them around the whole call; construction checks that they fit.
  stage_around_forward,
  /// The caller stages them (`views::streamed`, `dm.stage(module)`); `forward` does not.
  caller_stages,
};

/// What to distribute and how, besides the module, the devices and the policy.
/// \code
///   distorch::distribute_spec spec;
///   spec.compute = distorch::device_id::cuda(0);
///   spec.weights = {distorch::open_weights("model.gguf")};
///   spec.adapters = {{std::make_shared<distorch::adapter>(distorch::load_adapter("detail.safetensors")), 0.7}};
///   spec.keep_quantized = true;
///   spec.storage.homes = {{distorch::device_id::cpu(), distorch::dtype::f8_e4m3}};   // or "...;cpu,*:fp8"
///   spec.progress = [](const distorch::progress_report& p) { std::fprintf(stderr, "%llu/%llu\r", p.done, p.total); };
/// \endcode
struct distribute_spec {
  /// The device forward runs on; must be in the pool.
  device_id compute = device_id::cpu();
  /// Weight files, searched in order for each tensor by its module name; empty = the module's own
  /// current tensors.
  std::vector<std::shared_ptr<const weight_source>> weights;
  /// Adapters merged during the load, in order, with their strengths (any kind lora/ reads).
  adapter_set adapters;
  /// How adapter keys find the model's tensors: strict mode (unmatched keys are a `lora_error`),
  /// extra prefix rules, whether unmatched keys are logged.
  binding_options binding;
  /// Coarsens units, e.g. `{{R"(blocks\.\d+)"}}`: one unit per block.
  std::vector<grouping_rule> grouping;
  streaming_options streaming;
  /// Planner knobs; its prefetch depth is taken from `streaming` (one meaning: units ahead of the
  /// one running).
  planner_options planning;
  /// With the module's own weights as source, keep every unit's unpatched tensors in host memory so
  /// `set_adapters` can re-merge any unit. Without it only units some adapter touched at load
  /// time keep theirs. File sources re-read unpatched tensors from the file instead.
  bool keep_unpatched = false;
  /// GGUF sources: block-quantized tensors of units homed off the compute device stay quantized at
  /// home and are dequantized on the compute device after each fetch (see the file comment).
  bool keep_quantized = false;
  /// Homes that store floating tensors in a narrower dtype (float8, bfloat16, float16), cast back
  /// to the module's dtype after each fetch, and how they are rounded (runtime/storage_dtype.hpp).
  /// An allocation string's `:dtype` suffixes (`cpu,*:fp8`) are added to `storage.homes` by the
  /// constructor taking the policy; a device named both ways must agree.
  storage_options storage;
  /// Called after each unit is loaded (task "loading", counted in "units"), and after each unit
  /// is re-merged by `set_strengths` / `set_adapters` (task "merging").
  progress_callback progress;
  /// Who stages streamed units no `distorch::nn` layer covers (see `uncovered_units`).
  uncovered_units uncovered = uncovered_units::stage_around_forward;
  /// Buffers the weight files do not hold (non-persistent buffers: rotary `inv_freq`, masks),
  /// as regexes matched against the whole tensor name. A matching buffer keeps the module's own
  /// value and is never looked up in `weights`. A rule that matches no buffer, or that matches a
  /// parameter, is a `format_error` naming the rule.
  /// \code spec.non_persistent = {R"(layers\.\d+\.rotary\.inv_freq)"}; \endcode
  std::vector<std::string> non_persistent;
};

/// Bytes per device as the pool books them.
/// \code for (const distorch::device_usage& m : dm.memory()) std::cout << m.device.str() << ' ' << m.peak << '\n'; \endcode
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
  /// Plans with `policy` over the pool's devices and loads. Throws `placement_error` when the plan
  /// does not fit, `format_error` when a weight file lacks a tensor or holds another shape,
  /// `lora_error` when an adapter does not fit the model, and `device_error` when a copy cannot be
  /// made; in every case the module is left as it was.
  /// \code distorch::DistributedModule dm(seq, pool, distorch::policy_from_string("sim:0,2mb;cpu,*"), spec); \endcode
  DistributedModule(Module module, device_pool pool, Policy policy, distribute_spec spec, Allocator allocator = {})
      : module_(std::move(module)), pool_(std::move(pool)), policy_(std::move(policy)), spec_(std::move(spec)),
        allocator_(std::move(allocator)) {
    take_storage_of(policy_);
    bind();
    plan_ = with_home_bytes(make_plan_for(policy_, pool_.topo()));
    check_uncovered();
    load();
  }

  /// Loads by a plan made elsewhere (e.g. read from JSON); its units must be the module's units.
  /// \code distorch::DistributedModule<torch::nn::Sequential> dm(seq, pool, plan, spec); \endcode
  DistributedModule(Module module, device_pool pool, placement_plan plan, distribute_spec spec, Allocator allocator = {})
      : module_(std::move(module)), pool_(std::move(pool)), spec_(std::move(spec)), allocator_(std::move(allocator)) {
    bind();
    plan_ = with_home_bytes(aligned(std::move(plan)));
    check_uncovered();
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
    if (!loaded_) {
      std::unique_lock exclusive(gate_);
      if (!loaded_) rehome_to_loaded_plan();
    }
    std::shared_lock running(gate_);  // replan, unload and the adapter setters wait for no forward: they refuse
    // One pass per call: a unit left inside it stays staged until the next one enters, so a block
    // driven by several streamed layers is fetched once per forward.
    auto pass = manager_->pass();
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

  /// Stages the units of one submodule (an embedding, a final norm, a head outside a
  /// `views::streamed` loop) until the returned scope ends. On a simulated compute device, running
  /// such a module without it is a `device_error` naming its unit (strict mode). Throws
  /// `placement_error` for a module that is not part of this model.
  /// \code
  ///   { auto staged = dm.stage(*model->head); logits = model->head(h); }
  /// \endcode
  [[nodiscard]] unit_scope stage(const torch::nn::Module& submodule) { return unit_scope(manager_, units_of(submodule)); }

  /// The module; its parameters are the handles the runtime switches between devices.
  /// \code dm.module()->eval(); \endcode
  Module& module() noexcept { return module_; }
  /// The placement in force: unit -> home, per-device totals (home bytes: quantized where a unit
  /// stays quantized), window and reserve.
  /// \code std::cout << distorch::format_plan_table(dm.plan()); \endcode
  const placement_plan& plan() const noexcept { return plan_; }
  /// The module's units in model order.
  /// \code for (const auto& u : dm.units().units()) std::cout << u.name << '\n'; \endcode
  const inventory& units() const noexcept { return bound_.units; }
  /// \code dm.pool().used(distorch::device_id::cpu()); \endcode
  const device_pool& pool() const noexcept { return pool_; }
  /// The spec in force (its adapters carry the current strengths).
  /// \code double s = dm.spec().adapters[0].strength; \endcode
  const distribute_spec& spec() const noexcept { return spec_; }
  /// Where the adapters landed: matched keys, and the keys that match no model tensor.
  /// \code for (const auto& k : dm.adapter_binding().report().unmatched) std::cout << k.key << '\n'; \endcode
  const distorch::adapter_binding& adapter_binding() const noexcept { return binding_; }
  /// The residency manager that fetches and releases units.
  /// \code dm.residency().set_trace([](distorch::residency_event e) { /* ... */ }); \endcode
  residency_manager& residency() noexcept { return *manager_; }
  /// \code std::size_t n = dm.residency().size(); \endcode
  const residency_manager& residency() const noexcept { return *manager_; }

  /// Streaming statistics since construction or the last `reset_stats()`.
  /// \code std::cout << dm.stats().str() << '\n'; \endcode
  streaming_stats stats() const { return manager_->stats(); }
  /// \code dm.reset_stats(); \endcode
  void reset_stats() { manager_->reset_stats(); }

  /// Bytes booked on every pool device now (this model and anything else sharing the pool).
  /// \code for (const auto& m : dm.memory()) std::cout << m.device.str() << ' ' << m.used << '\n'; \endcode
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
  /// unit has moved and nothing stays booked. A quantized unit that moves to the compute device is
  /// dequantized there; a unit that leaves it stays dequantized (re-quantizing needs the file).
  /// Likewise a unit stored narrower is cast back when it moves to the compute device, and a unit
  /// leaving the compute device keeps the module's dtype. Storage dtypes are chosen at load: a
  /// policy whose `:dtype` suffixes differ from those in force is a `placement_error`.
  /// \code dm.replan(distorch::policy_from_string("sim:0,8mb;cpu,*")); \endcode
  template <placement_policy P>
  void replan(const P& policy) {
    const auto exclusive = refuse_while_running("replanning");
    check_replan_storage(policy);
    rehome(with_home_bytes(make_plan_for(policy, topology_without_self())));
  }

  /// Moves units to a given plan, without reloading.
  /// \code dm.replan(distorch::plan_from_json(text)); \endcode
  void replan(const placement_plan& plan) {
    const auto exclusive = refuse_while_running("replanning");
    rehome(with_home_bytes(aligned(plan)));
  }

  /// Changes the strengths of adapters by name (`adapter::name()`: the file path for loaded
  /// adapters) and re-merges, from the unpatched weights, only the units those adapters touch.
  /// Strength 0 gives the unpatched weights bit for bit. Throws `lora_error` for an unknown name
  /// (nothing changes then).
  /// \code dm.set_strengths({{"style.safetensors", 0.5}}); \endcode
  void set_strengths(const std::map<std::string, double>& strengths) {
    const auto exclusive = refuse_while_running("changing adapter strengths");
    adapter_set next = spec_.adapters;
    std::vector<bool> touched(bound_.units.size(), false);
    for (const auto& [name, s] : strengths) {
      bool found = false;
      for (std::size_t k = 0; k < next.size(); ++k) {
        if (!next[k].file || next[k].file->name() != name) continue;
        found = true;
        if (next[k].strength == s) continue;
        next[k].strength = s;
        mark_touched(binding_, k, touched);
      }
      if (!found)
        throw lora_error({"changing adapter strengths", name, std::nullopt, "no adapter of that name is loaded",
                          "use a name from dm.spec().adapters (adapter::name(), the file path for loaded adapters)"});
    }
    remerge(std::move(next), binding_, touched);
  }

  /// Changes the strengths of the adapter at `index` (in `spec().adapters`) and re-merges only the
  /// units it touches. Throws `lora_error` for an index out of range.
  /// \code dm.set_strength(1, 0.25); \endcode
  void set_strength(std::size_t index, double strength, std::optional<double> strength_model = std::nullopt) {
    const auto exclusive = refuse_while_running("changing an adapter strength");
    if (index >= spec_.adapters.size())
      throw lora_error({"changing adapter strength", std::to_string(index), std::nullopt,
                        "there are only " + std::to_string(spec_.adapters.size()) + " adapters",
                        "pass an index below the number of adapters"});
    adapter_set next = spec_.adapters;
    std::vector<bool> touched(bound_.units.size(), false);
    if (next[index].strength != strength || (strength_model && *strength_model != next[index].strength_model)) {
      next[index].strength = strength;
      if (strength_model) next[index].strength_model = *strength_model;
      mark_touched(binding_, index, touched);
    }
    remerge(std::move(next), binding_, touched);
  }

  /// Replaces the adapter set and re-merges only the units touched by the old or the new set. The
  /// new set is bound first: an adapter that does not fit throws `lora_error` and nothing changes.
  /// \code dm.set_adapters({{style, 1.0}, {detail, 0.5}}); \endcode
  void set_adapters(adapter_set adapters) {
    const auto exclusive = refuse_while_running("replacing the adapters");
    distorch::adapter_binding next = bind_adapters(adapters);
    std::vector<bool> touched(bound_.units.size(), false);
    for (const auto* b : {&binding_, &next})
      for (const auto& name : b->targets()) touched[unit_of_tensor_.at(name)] = true;
    remerge(std::move(adapters), std::move(next), touched);
  }

  /// Sends every unit to host memory (`cpu`), giving back everything the model holds on other
  /// devices; the plan it was loaded with is kept for `reload()`. A forward reloads by itself.
  /// Needs `cpu` in the pool. Nothing happens when the model is already unloaded.
  /// \code registry.unload_all();   // calls dm.unload() for every model not kept \endcode
  void unload() {
    const auto exclusive = refuse_while_running("unloading");
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
  /// \code dm.reload(); \endcode
  void reload() {
    const auto exclusive = refuse_while_running("reloading");
    rehome_to_loaded_plan();
  }

  /// \code if (!dm.loaded()) dm.reload(); \endcode
  bool loaded() const noexcept { return loaded_; }

  /// Units re-merged by the last `set_strengths` / `set_strength` / `set_adapters`.
  /// \code dm.set_strength(0, 0.5); auto n = dm.last_remerged().size(); \endcode
  const std::vector<std::size_t>& last_remerged() const noexcept { return last_remerged_; }

  /// Identity of every tensor the model holds now: (name, device, data pointer). The registry's
  /// retention check compares these before and after a free.
  /// \code auto before = dm.fingerprint(); \endcode
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
  using after_fetch_fn = std::function<at::Tensor(const at::Tensor&)>;

  // One unit after Load-Patch-Distribute: its copies at home and how each becomes usable after a
  // fetch (empty, or one function per tensor, set for the tensors kept quantized).
  struct loaded_unit {
    std::vector<held_tensor> placed;
    std::vector<after_fetch_fn> after_fetch;
    std::uint64_t home_bytes = 0;
  };

  torch::nn::Module& root() { return detail::module_of(module_); }

  void rehome_to_loaded_plan() {
    if (loaded_) return;
    rehome(loaded_plan_);
    loaded_ = true;
  }

  // Moving units under a running forward would race with it: refused, never waited for.
  std::unique_lock<std::shared_mutex> refuse_while_running(const char* doing) {
    std::unique_lock<std::shared_mutex> exclusive(gate_, std::try_to_lock);
    if (!exclusive.owns_lock())
      throw placement_error({doing, "DistributedModule", std::nullopt, "a forward is running on another thread",
                             "call it between forward calls, when no thread runs the model"});
    return exclusive;
  }

  // Which streamed units are inside a distorch::nn layer, and which are not.
  std::vector<bool> covered_units() {
    std::vector<bool> covered(bound_.units.size(), false);
    for (const auto& item : root().named_modules("", true))
      if (dynamic_cast<nn::streamed_module*>(item.value().get()))
        for (auto id : bound_.units_under(item.key())) covered[id] = true;
    return covered;
  }

  // Streamed units no distorch::nn layer covers are staged around the whole forward call: allowed
  // when they fit the compute device next to its resident units, window and reserve, with one
  // warning; otherwise a placement_error before anything moves, naming the largest of them.
  void check_uncovered() {
    if constexpr (detail::is_sequential_v<Module>) return;  // each child is staged on its own
    if (spec_.uncovered == uncovered_units::caller_stages) return;
    const auto covered = covered_units();
    std::vector<std::size_t> uncovered;
    std::uint64_t bytes = 0;
    for (std::size_t i = 0; i < covered.size(); ++i)
      if (!covered[i] && plan_.units[i].device != spec_.compute) {
        uncovered.push_back(i);
        bytes += bound_.units.units()[i].bytes;
      }
    if (uncovered.empty()) return;
    std::stable_sort(uncovered.begin(), uncovered.end(), [&](std::size_t a, std::size_t b) {
      return bound_.units.units()[a].bytes > bound_.units.units()[b].bytes;
    });
    std::string largest;
    for (std::size_t k = 0; k < uncovered.size() && k < 3; ++k)
      largest += (k ? ", " : "") + bound_.units.units()[uncovered[k]].name + " (" + format_bytes(bound_.units.units()[uncovered[k]].bytes) + ")";
    if (uncovered.size() > 3) largest += " and " + std::to_string(uncovered.size() - 3) + " more";
    const device_allotment* c = plan_.allotment(spec_.compute);
    const std::uint64_t resident = c ? c->placed_bytes : 0, window = c ? c->window : 0, reserve = c ? c->reserve : 0;
    const std::uint64_t need = resident + bytes + window + reserve, capacity = pool_.capacity(spec_.compute);
    const std::string what = std::to_string(uncovered.size()) + " streamed units are in plain torch::nn layers distorch cannot see (largest: " +
                             largest + "), so forward would stage " + format_bytes(bytes) + " of them around the whole call";
    const std::string ways = "make the model stream: `namespace nn = distorch::nn;` in the model file, a Sequential or ModuleList of "
                             "blocks driven by views::streamed, or distorch::nn::Streamed<Impl> for a custom layer "
                             "(docs/streaming.md, \"Make your model stream\"); or set spec.uncovered = caller_stages";
    if (need > capacity)
      throw placement_error({"distributing a module", spec_.compute.str(), std::nullopt,
                             what + ": with " + format_bytes(resident) + " resident, the " + format_bytes(window) + " window and the " +
                                 format_bytes(reserve) + " reserve that needs " + format_bytes(need) + " of " + format_bytes(capacity),
                             ways});
    log(log_level::warning, "distorch: " + what + " (" + format_bytes(need) + " of " + format_bytes(capacity) + " on " + spec_.compute.str() +
                                " while it runs: it fits); to " + ways);
  }

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
    for (std::size_t i = 0; i < bound_.names.size(); ++i)
      for (const auto& n : bound_.names[i]) unit_of_tensor_.emplace(n, i);
    // The module's dtypes, recorded before any handle points at a narrower stored copy.
    compute_types_.clear();
    for (const auto& hs : bound_.handles) {
      std::vector<at::ScalarType> types;
      for (const auto& h : hs) types.push_back(h.scalar_type());
      compute_types_.push_back(std::move(types));
    }
    check_storage();
    own_values_.clear();
    check_non_persistent();
    if (!spec_.weights.empty()) check_sources();
    binding_ = bind_adapters(spec_.adapters);
  }

  // The allocation string's storage suffixes join spec.storage; a device named both ways must agree.
  template <class P>
  void take_storage_of(const P& policy) {
    if constexpr (requires { policy.storage(); }) {
      for (const device_storage& s : policy.storage()) {
        if (const auto given = spec_.storage.of(s.device)) {
          if (*given != s.type)
            throw placement_error({"choosing storage dtypes", s.device.str(), std::nullopt,
                                   "the allocation string stores " + std::string(dtype_name(s.type)) + " on " + s.device.str() +
                                       ", spec.storage " + std::string(dtype_name(*given)),
                                   "name the device's storage dtype in one place"});
          continue;
        }
        spec_.storage.homes.push_back(s);
      }
    }
  }

  template <class P>
  void check_replan_storage(const P& policy) const {
    if constexpr (requires { policy.storage(); }) {
      for (const device_storage& s : policy.storage()) {
        const auto current = spec_.storage.of(s.device);
        if (current == s.type) continue;
        throw placement_error({"replanning", s.device.str(), std::nullopt,
                               "the policy stores " + std::string(dtype_name(s.type)) + " on " + s.device.str() + ", the model was loaded with " +
                                   (current ? std::string(dtype_name(*current)) : std::string("the module's dtypes")) + " there",
                               "storage dtypes are chosen at load: drop the suffix, or construct a new DistributedModule"});
      }
    }
  }

  // Every storage home must be a pool device other than the compute device, named once, with a
  // storage dtype this LibTorch has.
  void check_storage() const {
    const auto& homes = spec_.storage.homes;
    for (std::size_t k = 0; k < homes.size(); ++k) {
      const auto& h = homes[k];
      const std::string doing = "choosing the storage dtype of " + h.device.str();
      if (h.device == spec_.compute)
        throw placement_error({doing, h.device.str(), std::nullopt,
                               "the compute device stores no narrower dtype: units homed there run from their resident copy in the module's dtype",
                               "give the storage dtype to a donor (e.g. cpu,*:fp8), or cast the model itself"});
      if (!pool_.contains(h.device))
        throw placement_error({doing, h.device.str(), std::nullopt, "the device is not in the device pool (" + pool_.names() + ")",
                               "name a pool device"});
      for (std::size_t j = 0; j < k; ++j)
        if (homes[j].device == h.device && homes[j].type != h.type)
          throw placement_error({doing, h.device.str(), std::nullopt,
                                 "named twice, as " + std::string(dtype_name(homes[j].type)) + " and " + std::string(dtype_name(h.type)),
                                 "give each device one storage dtype"});
      (void)storage_scalar_type(h.type);  // float8 on LibTorch < 2.1, or no storage dtype at all
    }
  }

  // The dtype tensor t of unit i is stored in at `home`, when it is stored narrower there.
  std::optional<at::ScalarType> storage_type(std::size_t i, std::size_t t, const device_id& home) const {
    if (home == spec_.compute) return std::nullopt;
    const auto stored = spec_.storage.of(home);
    if (!stored) return std::nullopt;
    const at::ScalarType type = storage_scalar_type(*stored);
    if (!narrows_to(compute_types_[i][t], type)) return std::nullopt;
    return type;
  }

  // Adapters are matched against the names and shapes the module holds, before any tensor moves.
  distorch::adapter_binding bind_adapters(const adapter_set& adapters) const {
    std::vector<bind_target> targets;
    for (std::size_t i = 0; i < bound_.handles.size(); ++i)
      for (std::size_t t = 0; t < bound_.handles[i].size(); ++t) {
        const auto& h = bound_.handles[i][t];
        targets.push_back({bound_.names[i][t], h.sizes().vec(), h.is_floating_point()});
      }
    return distorch::adapter_binding::bind(targets, adapters, spec_.binding);
  }

  void mark_touched(const distorch::adapter_binding& b, std::size_t adapter_index, std::vector<bool>& touched) const {
    for (const auto& name : b.touched_by(adapter_index)) touched[unit_of_tensor_.at(name)] = true;
  }

  // Every tensor must be found in a source with its shape, before anything moves. The first source
  // that has a name serves it.
  // The non-persistent rules pick buffers that keep the module's values: each rule must match a
  // buffer, and none a parameter.
  void check_non_persistent() {
    for (const auto& text : spec_.non_persistent) {
      const std::string doing = "choosing non-persistent buffers";
      std::regex rule;
      try {
        rule = std::regex(text, std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        throw format_error({doing, text, std::nullopt, std::string("not a valid regex: ") + e.what(), "write an ECMAScript regex"});
      }
      bool matched = false;
      for (std::size_t i = 0; i < bound_.names.size(); ++i)
        for (std::size_t t = 0; t < bound_.names[i].size(); ++t) {
          const auto& name = bound_.names[i][t];
          if (!std::regex_match(name, rule)) continue;
          if (!bound_.buffer_owners[i][t])
            throw format_error({doing, text, std::nullopt, "the rule matches the parameter '" + name + "'; parameters always come from the weight files",
                                "narrow the rule to buffers"});
          matched = true;
          own_values_.try_emplace(name, bound_.handles[i][t].data());
        }
      if (!matched)
        throw format_error({doing, text, std::nullopt, "the rule matches no buffer of the module",
                            "match whole buffer names, e.g. " + std::string(R"(layers\.\d+\.inv_freq)")});
    }
  }

  void check_sources() {
    for (const auto& src : spec_.weights)
      for (const auto& r : src->records()) sources_.try_emplace(r.name, source_entry{src.get(), &r});
    for (std::size_t i = 0; i < bound_.handles.size(); ++i)
      for (std::size_t t = 0; t < bound_.handles[i].size(); ++t) {
        const auto& name = bound_.names[i][t];
        if (own_values_.contains(name)) continue;
        const auto it = sources_.find(name);
        const auto& h = bound_.handles[i][t];
        if (it == sources_.end())
          throw format_error({"matching weight files to the module", name, std::nullopt, "no weight file has this tensor",
                              "pass the weight files that hold every parameter and buffer of the model" +
                                  std::string(bound_.buffer_owners[i][t] ? ", or name the buffer in spec.non_persistent" : "")});
        if (it->second.record->shape != std::vector<std::int64_t>(h.sizes().begin(), h.sizes().end()))
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
    // One depth meaning: the planner keeps the unit that runs and `depth` ahead of it free, what
    // the runtime's window holds (the unit in flight while loading fits in that room too).
    options.prefetch_depth = spec_.streaming.prefetch_depth;
    return make_plan(bound_.units, topo, spec_.compute, policy, options);
  }

  // The planner decides homes with every unit at its size on the compute device (which is what
  // the compute device holds when the unit runs there, resident or fetched), so the compute
  // device's resident bytes and window are exact. A unit that stays quantized at a donor home
  // takes only its quantized bytes there: the plan records that size for it and its device.
  placement_plan with_home_bytes(placement_plan plan) const {
    if ((!spec_.keep_quantized || spec_.weights.empty()) && spec_.storage.homes.empty()) return plan;
    for (std::size_t i = 0; i < plan.units.size(); ++i) {
      auto& u = plan.units[i];
      const std::uint64_t bytes = u.device == spec_.compute ? bound_.units.units()[i].bytes : home_bytes_of(i, u.device);
      if (bytes == u.bytes) continue;
      for (auto& d : plan.devices)
        if (d.device == u.device) d.placed_bytes = d.placed_bytes - u.bytes + bytes;
      u.bytes = bytes;
    }
    return plan;
  }

  // Bytes unit i takes at a donor home: tensors kept quantized at their stored size, tensors stored
  // narrower at the storage dtype's size, the others (and the ones an adapter patches, under
  // keep_quantized) at their full size.
  std::uint64_t home_bytes_of(std::size_t i, const device_id& home) const {
    std::uint64_t total = 0;
    for (std::size_t t = 0; t < bound_.handles[i].size(); ++t) total += tensor_home_bytes(i, t, home);
    return total;
  }

  // Bytes tensor t of unit i takes at a donor home (see home_bytes_of).
  std::uint64_t tensor_home_bytes(std::size_t i, std::size_t t, const device_id& home) const {
    const auto numel = static_cast<std::uint64_t>(bound_.handles[i][t].numel());
    if (const auto* info = quantized_info(i, t)) return info->bytes;
    if (const auto stored = storage_type(i, t, home)) return numel * c10::elementSize(*stored);
    return numel * c10::elementSize(compute_types_[i][t]);
  }

  // The GGUF tensor info of tensor t of unit i when, under keep_quantized, it stays quantized at a
  // donor home: a block-quantized type from a GGUF source that no adapter patches.
  const gguf_tensor_info* quantized_info(std::size_t i, std::size_t t) const {
    if (!spec_.keep_quantized) return nullptr;
    const auto& name = bound_.names[i][t];
    if (own_values_.contains(name)) return nullptr;
    const auto it = sources_.find(name);
    if (it == sources_.end()) return nullptr;
    const auto* gguf = dynamic_cast<const gguf_source*>(it->second.source);
    if (gguf == nullptr) return nullptr;
    const auto& info = gguf->info(name);
    if (detail::ggml_scalar_type(info.type).has_value()) return nullptr;  // stored plain: nothing to gain
    if (binding_.patches_for(name) != nullptr) return nullptr;
    return &info;
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
    return pin_homes_ && home.is_cpu() && target.torch_device.type() == c10::DeviceType::CUDA;
  }

  // Decides before anything is placed whether CPU homes are pinned or a bounded staging ring
  // carries them, so pinned RAM never silently doubles the model (runtime/host_staging.hpp).
  void decide_host_staging() {
    const bool async_reads = device_of(spec_.compute).torch_device.type() == c10::DeviceType::CUDA;
    // Pinned homes take what the caching host allocator rounds each tensor up to.
    std::uint64_t cpu_home_bytes = 0, largest = 0;
    for (std::size_t i = 0; i < plan_.units.size(); ++i) {
      const auto& u = plan_.units[i];
      if (!u.device.is_cpu() || u.device == spec_.compute) continue;
      for (std::size_t t = 0; t < bound_.handles[i].size(); ++t) cpu_home_bytes += pinned_block_bytes(tensor_home_bytes(i, t, u.device));
      largest = std::max(largest, u.bytes);
    }
    const auto choice = choose_host_staging(spec_.streaming, async_reads, cpu_home_bytes, largest, host_memory());
    pin_homes_ = choice.pin_homes;
    spec_.streaming.staging_ring_bytes = choice.ring_bytes;
  }

  at::Tensor unpatched_source(std::size_t unit, std::size_t t, const std::vector<std::vector<at::Tensor>>& originals) const {
    if (spec_.weights.empty()) return originals[unit][t];
    const auto& name = bound_.names[unit][t];
    if (const auto own = own_values_.find(name); own != own_values_.end()) return own->second;
    const auto it = sources_.find(name);
    if (it != sources_.end()) return it->second.source->load(name);
    throw format_error({"reading weights", name, std::nullopt, "no weight file has this tensor", "pass the right weight files"});
  }

  // The merge steps for one tensor at the strengths of `adapters` (empty when nothing targets it).
  static std::vector<merge_step> steps_for(const distorch::adapter_binding& b, const adapter_set& adapters,
                                           const std::string& name) {
    std::vector<merge_step> steps;
    if (const auto* patches = b.patches_for(name))
      for (const auto& p : *patches) {
        const auto& use = adapters.at(p.adapter_index);
        steps.push_back({use.file.get(), p.group, p.bias, use.strength, use.strength_model});
      }
    return steps;
  }

  // Load-Patch-Distribute one unit: a tensor an adapter patches (or one homed on the compute
  // device) is staged on compute, patched there at full precision and placed at home; any other
  // goes straight to its home. Returns the home copies.
  loaded_unit load_unit(std::size_t i, const device_id& home, const distorch::adapter_binding& b, const adapter_set& adapters,
                        const std::vector<std::vector<at::Tensor>>& originals) const {
    const auto& name = bound_.units.units()[i].name;
    const auto& compute = device_of(spec_.compute);
    const auto& target = device_of(home);
    loaded_unit out;
    for (std::size_t t = 0; t < bound_.handles[i].size(); ++t) {
      const auto& tensor_name = bound_.names[i][t];
      if (home != spec_.compute && !spec_.weights.empty())
        if (const auto* info = quantized_info(i, t)) {
          place_quantized(i, t, *info, target, out);
          continue;
        }
      at::Tensor source = unpatched_source(i, t, originals);
      const at::ScalarType module_type = compute_types_[i][t];  // the handle may hold a stored copy by now
      if (source.scalar_type() != module_type)
        throw format_error({"loading unit '" + name + "'", tensor_name, std::nullopt,
                            "stored as " + std::string(c10::toString(source.scalar_type())) + ", the module holds " +
                                std::string(c10::toString(module_type)),
                            "load weights stored in the model's dtypes"});
      const auto steps = steps_for(b, adapters, tensor_name);
      const auto stored = storage_type(i, t, home);
      if (home != spec_.compute && steps.empty()) {
        // Nothing patches it: from the file (or the module) straight to its home, never over the
        // compute device's link; a narrower storage dtype is cast where the tensor is.
        const at::Tensor at_home =
            stored ? cast_for_storage(source, *stored, spec_.storage.rounding, spec_.storage.seed, tensor_name) : source;
        out.home_bytes += static_cast<std::uint64_t>(at_home.numel()) * at_home.element_size();
        out.placed.push_back(allocator_.copy_to(at_home, pool_, target, {pin_for(home), false, "placing unit '" + name + "'"}));
        add_after_fetch(out, t, stored, module_type);
        continue;
      }
      held_tensor staged = allocator_.copy_to(source, pool_, compute, {false, false, "staging unit '" + name + "'"});
      at::Tensor merged = staged.data;
      if (!steps.empty()) {
        // Going to a storage dtype, a half-precision weight is merged in a float32 copy (merge
        // scratch) so that it is rounded once, to the storage dtype.
        if (stored && module_type != at::kFloat && module_type != at::kDouble) merged = merged.to(at::kFloat);
        merge_into(merged, steps, compute.torch_device);  // float32, one rounding, in place
      }
      // Cast down on the compute device, after the merge; the staging booking covers the result.
      const at::Tensor at_home =
          stored ? cast_for_storage(merged, *stored, spec_.storage.rounding, spec_.storage.seed, tensor_name) : merged;
      out.home_bytes += static_cast<std::uint64_t>(at_home.numel()) * at_home.element_size();
      if (home == spec_.compute) {
        out.placed.push_back(std::move(staged));
      } else {
        out.placed.push_back(allocator_.copy_to(at_home, pool_, target, {pin_for(home), false, "placing unit '" + name + "'"}));
      }  // the staging copy is dropped here
      add_after_fetch(out, t, stored, module_type);
    }
    return out;
  }

  // Tensor t of a loaded unit stored narrower is cast back to the module's dtype after each fetch.
  static void add_after_fetch(loaded_unit& out, std::size_t t, const std::optional<at::ScalarType>& stored, at::ScalarType module_type) {
    if (stored) {
      out.after_fetch.resize(t);  // the tensors before this one need nothing (or have theirs)
      out.after_fetch.emplace_back([module_type](const at::Tensor& fetched) { return fetched.to(module_type); });
    } else if (!out.after_fetch.empty()) {
      out.after_fetch.emplace_back();
    }
  }

  // A tensor that stays quantized goes from the file to its home as raw blocks; it never needs the
  // compute device while loading (nothing patches it).
  void place_quantized(std::size_t i, std::size_t t, const gguf_tensor_info& info, const pool_device& target,
                       loaded_unit& out) const {
    const auto& name = bound_.names[i][t];
    const auto& handle = bound_.handles[i][t];
    const std::string unit_name = "unit '" + bound_.units.units()[i].name + "'";
    if (handle.scalar_type() != at::kFloat)
      throw format_error({"loading " + unit_name, name, std::nullopt,
                          std::string("quantized tensors dequantize to float32, the module holds ") + c10::toString(handle.scalar_type()),
                          "make the module float32, or load without keep_quantized"});
    if (!ggml_can_dequantize(info.type))
      throw format_error({"loading " + unit_name, name, std::nullopt,
                          "ggml type " + std::string(ggml_type_name(info.type)) + " has no float32 conversion in distorch",
                          "requantize the file to Q8_0, Q*_K or F16"});
    const auto* gguf = static_cast<const gguf_source*>(sources_.at(name).source);
    quantized_tensor q = gguf->load_quantized(name);
    // The raw blocks rest and travel inside a float32 carrier: the residency manager points the
    // parameter handles at their home tensors between uses, and a parameter may only ever hold
    // floating data (set_data refuses bytes on a tensor that requires grad).
    const std::int64_t bytes = q.data.numel();
    at::Tensor carrier = at::zeros({(bytes + 3) / 4}, at::TensorOptions().dtype(at::kFloat));
    carrier.view(at::kByte).narrow(0, 0, bytes).copy_(q.data);
    out.placed.push_back(allocator_.copy_to(carrier, pool_, target, {pin_for(target.id), false, "placing " + unit_name}));
    out.home_bytes += static_cast<std::uint64_t>(carrier.numel()) * carrier.element_size();
    out.after_fetch.resize(t);  // the tensors before this one need nothing
    out.after_fetch.emplace_back([type = q.type, shape = q.shape, name, bytes](const at::Tensor& fetched) {
      return dequantize(quantized_tensor{fetched.view(at::kByte).narrow(0, 0, bytes), type, shape, name});
    });
  }

  residency_unit make_residency_unit(std::size_t i, const device_id& home, loaded_unit loaded) const {
    residency_unit u;
    u.name = bound_.units.units()[i].name;
    u.home = home;
    u.bytes = loaded.home_bytes;
    u.handles = bound_.handles[i];
    u.home_data = std::move(loaded.placed);
    std::vector<std::shared_ptr<torch::nn::Module>> owners;
    for (const auto& owner : bound_.buffer_owners[i])
      if (owner && std::find(owners.begin(), owners.end(), owner) == owners.end()) owners.push_back(owner);
    if (!owners.empty()) {
      for (const auto& owner : bound_.buffer_owners[i]) u.buffers.push_back(owner != nullptr);
      u.training = [owners = std::move(owners)] {
        return std::any_of(owners.begin(), owners.end(), [](const auto& m) { return m->is_training(); });
      };
    }
    if (!loaded.after_fetch.empty()) {
      loaded.after_fetch.resize(u.handles.size());
      u.after_fetch = std::move(loaded.after_fetch);
      u.compute_bytes = bound_.units.units()[i].bytes;  // what the compute device holds once it is staged
    }
    return u;
  }

  // Points every handle of a unit at its home copy (for a tensor kept quantized: its carrier).
  static void point_handles(residency_unit& u) {
    for (std::size_t t = 0; t < u.handles.size(); ++t) u.handles[t].set_data(u.home_data[t].data);
  }

  void load() {
    decide_host_staging();
    std::vector<std::vector<at::Tensor>> originals;
    for (const auto& hs : bound_.handles) {
      std::vector<at::Tensor> o;
      for (const auto& h : hs) o.push_back(h.data());
      originals.push_back(std::move(o));
    }
    std::vector<residency_unit> units;
    units.reserve(bound_.units.size());
    const std::size_t n = bound_.units.size();
    try {
      for (std::size_t i = 0; i < n; ++i) {
        const device_id home = plan_.units[i].device;
        units.push_back(make_residency_unit(i, home, load_unit(i, home, binding_, spec_.adapters, originals)));
        point_handles(units.back());
        report_progress(spec_.progress, "loading", i + 1, n, "units");
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
        for (const auto& name : bound_.names[i]) keep = keep || binding_.patches_for(name) != nullptr;
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
    for (const auto& item : root().named_modules("", true)) {
      auto* s = dynamic_cast<nn::streamed_module*>(item.value().get());
      if (!s) continue;
      s->attach_residency(manager_, bound_.units_under(item.key()));
      streamed_.push_back(s);
    }
    const auto covered = covered_units();
    uncovered_.clear();
    for (std::size_t i = 0; i < covered.size(); ++i)
      if (!covered[i] && manager_->streams(i)) uncovered_.push_back(i);
    if (detail::is_sequential_v<Module> || spec_.uncovered == uncovered_units::caller_stages) uncovered_.clear();
  }

  // Moves every unit whose home changes; all new copies are made before any handle switches. A
  // quantized unit moving to the compute device is dequantized there, since nothing fetches it.
  void rehome(const placement_plan& next) {
    auto units = manager_->take_units();
    std::vector<std::vector<held_tensor>> fresh(units.size());
    // Units moved to the host are pinned only while every pinned home stays within the pinned
    // limit (unload() sends the whole model there); the rest rest in pageable memory.
    const std::uint64_t pinned_limit = pinned_limit_of(spec_.streaming, host_memory());
    std::uint64_t pinned = 0;
    if (pin_for(device_id::cpu()))
      for (std::size_t i = 0; i < units.size(); ++i)
        if (units[i].home.is_cpu() && next.units[i].device.is_cpu())
          for (const auto& h : units[i].home_data)
            if (h.data.is_pinned()) pinned += h.booked.bytes();
    try {
      for (std::size_t i = 0; i < units.size(); ++i) {
        const device_id home = next.units[i].device;
        if (home == units[i].home) continue;
        const std::string doing = "moving unit '" + units[i].name + "' to " + home.str();
        for (std::size_t t = 0; t < units[i].home_data.size(); ++t) {
          const at::Tensor& data = units[i].home_data[t].data;
          const bool dequantize_now = home == spec_.compute && t < units[i].after_fetch.size() && units[i].after_fetch[t];
          const at::Tensor source = dequantize_now ? units[i].after_fetch[t](data) : data;
          bool pin = pin_for(home);
          if (pin) {
            const std::uint64_t block = pinned_block_bytes(static_cast<std::uint64_t>(source.numel()) * source.element_size());
            pin = pinned + block <= pinned_limit;
            if (pin) pinned += block;
          }
          fresh[i].push_back(allocator_.copy_to(source, pool_, device_of(home), {pin, false, doing}));
        }
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
      if (units[i].home == spec_.compute && !units[i].after_fetch.empty()) {
        units[i].after_fetch.clear();
        units[i].bytes = bound_.units.units()[i].bytes;
        units[i].compute_bytes = 0;
      }
      point_handles(units[i]);
    }
    plan_ = next;
    for (std::size_t i = 0; i < units.size(); ++i) record_home_bytes(i, units[i]);
    install(std::move(units));
  }

  // The plan records what unit i's home really holds.
  void record_home_bytes(std::size_t i, const residency_unit& u) {
    auto& p = plan_.units[i];
    if (p.bytes == u.bytes) return;
    for (auto& d : plan_.devices)
      if (d.device == p.device) d.placed_bytes = d.placed_bytes - p.bytes + u.bytes;
    p.bytes = u.bytes;
  }

  void remerge(adapter_set adapters, distorch::adapter_binding binding, const std::vector<bool>& touched) {
    for (std::size_t i = 0; i < touched.size(); ++i)
      if (touched[i] && spec_.weights.empty() && unpatched_[i].empty())
        throw lora_error({"re-merging adapters", bound_.units.units()[i].name, error_position{"unit", i},
                          "the unit's unpatched weights were not kept", "construct with keep_unpatched = true or load from weight files"});
    auto units = manager_->take_units();
    std::vector<std::optional<loaded_unit>> fresh(units.size());
    const auto count = static_cast<std::uint64_t>(std::count(touched.begin(), touched.end(), true));
    std::uint64_t done = 0;
    try {
      for (std::size_t i = 0; i < units.size(); ++i)
        if (touched[i]) {
          fresh[i] = load_unit(i, units[i].home, binding, adapters, unpatched_);
          report_progress(spec_.progress, "merging", ++done, count, "units");
        }
    } catch (...) {
      fresh.clear();
      install(std::move(units));
      throw;
    }
    last_remerged_.clear();
    for (std::size_t i = 0; i < units.size(); ++i) {
      if (!touched[i]) continue;
      units[i] = make_residency_unit(i, units[i].home, std::move(*fresh[i]));
      point_handles(units[i]);
      last_remerged_.push_back(i);
    }
    spec_.adapters = std::move(adapters);
    binding_ = std::move(binding);
    // A unit re-merged where it rested in the module's dtype (moved there by a replan) is cast now.
    for (const std::size_t i : last_remerged_) record_home_bytes(i, units[i]);
    install(std::move(units));
  }

  struct source_entry {
    const weight_source* source = nullptr;
    const tensor_record* record = nullptr;
  };

  Module module_;
  device_pool pool_;
  Policy policy_{};
  distribute_spec spec_;
  Allocator allocator_;
  bound_module bound_;
  distorch::adapter_binding binding_;
  placement_plan plan_;
  bool pin_homes_ = false;  // decide_host_staging: pin CPU homes (else plain memory, perhaps a ring)
  std::shared_ptr<residency_manager> manager_;
  std::unordered_map<const torch::nn::Module*, std::string> paths_;
  std::unordered_map<std::string, std::size_t> unit_of_tensor_;
  std::unordered_map<std::string, source_entry> sources_;
  std::unordered_map<std::string, at::Tensor> own_values_;  // non-persistent buffers: name -> the module's value
  std::vector<std::vector<std::size_t>> sequential_units_;
  std::vector<std::size_t> uncovered_;
  std::vector<nn::streamed_module*> streamed_;
  std::vector<std::vector<at::Tensor>> unpatched_;
  std::vector<std::vector<at::ScalarType>> compute_types_;  // per unit, per tensor: the module's dtype
  std::vector<std::size_t> last_remerged_;
  placement_plan loaded_plan_;
  std::atomic<bool> loaded_{true};
  std::shared_mutex gate_;  // shared: forward calls; exclusive: whatever moves units
};

}  // namespace distorch::inline v0
