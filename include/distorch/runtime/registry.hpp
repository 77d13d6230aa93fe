#pragma once
/// \file
/// `model_registry`: the loaded models of a program, each with a `keep_loaded` flag, and the one
/// place memory is freed. Retention is an invariant here, not a hope:
/// - `unload_all()` unloads exactly the loaded models that are not kept. When there is none it is a
///   strict no-op: no tensor moves, nothing is booked or freed, no cache is cleared.
/// - `free()` is `unload_all()` followed by cache clearing on every device (`empty_caches`). Around
///   it the registry records where every tensor of every kept model lives (name, device, data
///   pointer) and checks it afterwards; any difference is a `retention_error` naming the model and
///   the tensor.
/// - Named memory snapshots of the pool's devices print as one aligned series.
///
/// A model is anything with `unload()`, `loaded()` and `fingerprint()`, such as `DistributedModule`;
/// the registry shares ownership of it.
///
/// Example:
/// \code
///   distorch::model_registry registry(pool);
///   registry.add("text_encoder", encoder_dm);             // std::shared_ptr<DistributedModule<...>>
///   registry.add("unet", unet_dm, /*keep_loaded=*/true);
///   registry.snapshot("loaded");
///   registry.free();                                      // unloads the encoder only; checks the unet
///   registry.snapshot("after free");
///   std::cout << registry.memory().table();
/// \endcode

#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/device/empty_caches.hpp"
#include "distorch/memory/snapshot.hpp"
#include "distorch/runtime/device_pool.hpp"

namespace distorch::inline v0 {

/// Where each tensor of a model lives: (tensor name, device, data pointer).
/// \code distorch::tensor_fingerprint f = dm.fingerprint(); \endcode
using tensor_fingerprint = std::vector<std::tuple<std::string, device_id, const void*>>;

/// What the registry needs from a model.
/// \code static_assert(distorch::registrable_model<distorch::DistributedModule<torch::nn::Sequential>>); \endcode
template <class M>
concept registrable_model = requires(M& m, const M& cm) {
  m.unload();
  { cm.loaded() } -> std::convertible_to<bool>;
  { cm.fingerprint() } -> std::convertible_to<tensor_fingerprint>;
};

/// The kept models' fingerprints at one moment, for `model_registry::verify`.
/// \code auto before = registry.snapshot_kept(); registry.free(); registry.verify(before); \endcode
struct retention_snapshot {
  std::vector<std::pair<std::string, tensor_fingerprint>> kept;
};

/// What `free()` did.
/// \code for (const auto& name : registry.free().unloaded) std::cout << name << '\n'; \endcode
struct free_report {
  std::vector<std::string> unloaded;  ///< models unloaded, in registration order
  cache_release_report caches;
};

/// See the file comment.
/// \code distorch::model_registry registry(pool); \endcode
class model_registry {
 public:
  /// `pool` is the pool the models book on; snapshots measure its devices.
  /// \code distorch::model_registry registry(pool); \endcode
  explicit model_registry(device_pool pool = {}) : pool_(std::move(pool)) {}

  /// Registers a model under a unique name; `placement_error` when the name is taken.
  /// \code registry.add("vae", vae_dm, false); \endcode
  template <registrable_model M>
  void add(std::string name, std::shared_ptr<M> model, bool keep_loaded = false) {
    if (find(name) != nullptr)
      throw placement_error({"registering a model", name, std::nullopt, "a model of that name is already registered",
                             "give each model a distinct name, or remove the old one first"});
    entry e;
    e.name = std::move(name);
    e.keep = keep_loaded;
    e.owner = model;
    M* raw = model.get();
    e.unload = [raw] { raw->unload(); };
    e.loaded = [raw] { return static_cast<bool>(raw->loaded()); };
    e.fingerprint = [raw] { return tensor_fingerprint(raw->fingerprint()); };
    entries_.push_back(std::move(e));
  }

  /// Sets or clears a model's keep_loaded flag; `placement_error` for an unknown name.
  /// \code registry.keep_loaded("text_encoder"); \endcode
  void keep_loaded(std::string_view name, bool keep = true) { at(name).keep = keep; }
  /// Whether a model is kept. \code CHECK(registry.is_kept("text_encoder")); \endcode
  bool is_kept(std::string_view name) const { return at(name).keep; }
  /// Whether a model is loaded. \code CHECK(!registry.is_loaded("vae")); \endcode
  bool is_loaded(std::string_view name) const { return at(name).loaded(); }
  /// Whether a model of that name is registered. \code registry.contains("unet"); \endcode
  bool contains(std::string_view name) const { return find(name) != nullptr; }
  /// Number of registered models. \code registry.size(); \endcode
  std::size_t size() const noexcept { return entries_.size(); }

  /// Drops the registry's share of a model (the model itself lives on while others hold it).
  /// \code registry.remove("vae"); \endcode
  void remove(std::string_view name) {
    auto& e = at(name);
    entries_.erase(entries_.begin() + (&e - entries_.data()));
  }

  /// Names of the models in registration order.
  /// \code for (const auto& n : registry.names()) std::cout << n; \endcode
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : entries_) out.push_back(e.name);
    return out;
  }

  /// Unloads exactly the loaded models not kept, and returns their names. Nothing else happens;
  /// with nothing to unload, nothing at all happens.
  /// \code auto gone = registry.unload_all(); \endcode
  std::vector<std::string> unload_all() {
    std::vector<std::string> unloaded;
    for (auto& e : entries_) {
      if (e.keep || !e.loaded()) continue;
      e.unload();
      unloaded.push_back(e.name);
    }
    return unloaded;
  }

  /// `unload_all()`, then cache clearing on every device, then the retention check.
  /// Throws `retention_error` when a kept model lost a tensor or had one moved.
  /// \code registry.free(); \endcode
  free_report free() {
    const retention_snapshot before = snapshot_kept();
    free_report report;
    report.unloaded = unload_all();
    report.caches = empty_caches();
    verify(before);
    return report;
  }

  /// The kept models' fingerprints now.
  /// \code auto before = registry.snapshot_kept(); \endcode
  retention_snapshot snapshot_kept() const {
    retention_snapshot s;
    for (const auto& e : entries_)
      if (e.keep) s.kept.emplace_back(e.name, e.fingerprint());
    return s;
  }

  /// Checks that every model kept in `before` still has every tensor, on the same device, at the
  /// same address; `retention_error` naming the model and tensor otherwise.
  /// \code registry.verify(before); \endcode
  void verify(const retention_snapshot& before) const {
    for (const auto& [name, then] : before.kept) {
      const entry* e = find(name);
      if (e == nullptr)
        throw retention_error({"checking retention", name, std::nullopt, "a kept model left the registry during a free",
                               "remove kept models explicitly, outside free()"});
      const tensor_fingerprint now = e->fingerprint();
      for (std::size_t i = 0; i < then.size(); ++i) {
        const auto& [tensor, device, data] = then[i];
        const auto it = std::find_if(now.begin(), now.end(), [&](const auto& t) { return std::get<0>(t) == tensor; });
        if (it == now.end() || std::get<2>(*it) == nullptr)
          throw retention_error({"checking retention of kept model '" + name + "'", tensor, error_position{"tensor", i},
                                 "the tensor was lost", "do not unload or free a model flagged keep_loaded"});
        if (std::get<1>(*it) != device || std::get<2>(*it) != data)
          throw retention_error({"checking retention of kept model '" + name + "'", tensor, error_position{"tensor", i},
                                 "the tensor moved from " + device.str() + " to " + std::get<1>(*it).str(),
                                 "do not move a model flagged keep_loaded during a free"});
      }
    }
  }

  /// Records the pool's devices (used, total; LibTorch's allocated and reserved where the backend
  /// reports them) under a checkpoint name.
  /// \code registry.snapshot("after free"); std::cout << registry.memory().table(); \endcode
  const memory_snapshot& snapshot(std::string checkpoint) {
    memory_snapshot s{std::move(checkpoint), {}};
    for (const auto& d : pool_.devices()) {
      device_memory m;
      m.device = d.id;
      m.used = d.budget->used();
      m.total = d.budget->capacity();
      if (d.torch_device.type() == c10::DeviceType::CUDA)
        if (auto stats = cuda_allocator_stats(d.torch_device.has_index() ? d.torch_device.index() : 0)) {
          m.torch_allocated = stats->allocated;
          m.torch_reserved = stats->reserved;
        }
      s.devices.push_back(m);
    }
    return series_.add(std::move(s));
  }

  /// Every snapshot taken, as one series. \code std::cout << registry.memory().table(); \endcode
  const memory_series& memory() const noexcept { return series_; }

 private:
  struct entry {
    std::string name;
    bool keep = false;
    std::shared_ptr<void> owner;
    std::function<void()> unload;
    std::function<bool()> loaded;
    std::function<tensor_fingerprint()> fingerprint;
  };

  const entry* find(std::string_view name) const {
    for (const auto& e : entries_)
      if (e.name == name) return &e;
    return nullptr;
  }
  entry& at(std::string_view name) { return const_cast<entry&>(std::as_const(*this).at(name)); }
  const entry& at(std::string_view name) const {
    if (const entry* e = find(name)) return *e;
    throw placement_error({"looking up a registered model", std::string(name), std::nullopt, "no model of that name is registered",
                           "use a name given to add()"});
  }

  device_pool pool_;
  std::vector<entry> entries_;
  memory_series series_;
};

}  // namespace distorch::inline v0
