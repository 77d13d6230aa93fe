#pragma once
/// \file
/// `residency_manager`: keeps each unit's weights where compute needs them. Units homed on the
/// compute device stay resident. A unit homed elsewhere is fetched to the compute device before it
/// runs (`enter`) and released after (`leave`): every parameter handle the model holds is switched
/// in place with `Tensor::set_data`, so the model sees the fetched copy without knowing.
///
/// Why it is built this way:
/// - The execution order is not known in C++ (modules have no hooks), so it is learned: the order
///   in which units first enter is recorded, and later entries prefetch the `depth` units that
///   followed them, within a byte window.
/// - On stream devices (CUDA, XPU, ...) copies are queued on a side stream taken from the device
///   guard interface (`c10::impl::VirtualGuardImpl`), so one code path serves every backend. The
///   compute stream waits on the unit's own event, never on the whole copy stream. A release
///   records an event on the compute stream and makes the copy stream wait on it before anything
///   else is queued there: the caching allocator then cannot hand the released block to a new copy
///   while compute may still read it.
/// - On the CPU and on simulated devices copies are synchronous. A unit fetched to a simulated
///   compute device gets a real, separate copy booked on that device, so fetch and release are
///   visible in its accounting.
/// - Fetching is one policy (copy to compute, run there); the manager keeps `enter`/`leave` apart
///   from how a unit is staged so that a second mode (run at home, move activations) can follow.
///
/// Example:
/// \code
///   distorch::residency_manager manager(pool, distorch::device_id::sim(0), std::move(units), {.prefetch_depth = 2});
///   manager.enter(3);   // unit 3's weights are now on sim:0
///   run_unit_3();
///   manager.leave(3);   // back at home; its sim:0 bytes are given back
///   manager.stats().prefetch_hits;
/// \endcode

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "distorch/core/error.hpp"
#include "distorch/core/log.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/runtime/device_pool.hpp"
#include "distorch/runtime/streaming_stats.hpp"
#include "distorch/runtime/unit_allocator.hpp"

namespace distorch::inline v0 {

/// How streaming behaves.
struct streaming_options {
  /// Units fetched ahead of the one running. 0 = fetch synchronously when a unit enters.
  std::size_t prefetch_depth = 1;
  /// Keep CPU homes in page-locked memory when the compute device reads them with async copies.
  bool pinned_host = true;
  /// Most bytes of fetched (not compute-homed) units held on the compute device at once by
  /// prefetching; 0 = (prefetch_depth + 1) × the largest streamed unit. The unit that must run is
  /// always fetched, even beyond the window.
  std::uint64_t window = 0;
};

/// One unit as the manager holds it: the module's tensor handles and their copies at home.
struct residency_unit {
  std::string name;
  device_id home;
  std::uint64_t bytes = 0;
  std::vector<at::Tensor> handles;       ///< the module's own parameter / buffer tensors
  std::vector<held_tensor> home_data;    ///< one per handle: the bytes at home
};

/// What happened, for tracing and tests.
enum class residency_event_kind : std::uint8_t { fetch, prefetch, enter, leave, release };

struct residency_event {
  residency_event_kind kind;
  std::size_t unit;
};

/// Copies a tensor to a pool device with booking; the manager's view of the allocator.
using tensor_copier = std::function<held_tensor(const at::Tensor&, const pool_device&, const copy_request&)>;

/// See the file comment.
class residency_manager {
 public:
  /// Takes the units (already at their homes; handles pointing at `home_data`, or at the resident
  /// copy for compute-homed units). `copier` defaults to `booked_copy_allocator`.
  /// \code distorch::residency_manager m(pool, distorch::device_id::sim(0), std::move(units), {}); \endcode
  residency_manager(device_pool pool, device_id compute, std::vector<residency_unit> units, streaming_options options = {},
                    tensor_copier copier = {})
      : pool_(std::move(pool)), compute_(compute), options_(options), units_(std::move(units)) {
    target_ = &pool_.at(compute_);
    if (!copier) {
      copier = [pool = pool_](const at::Tensor& t, const pool_device& d, const copy_request& r) {
        return booked_copy_allocator{}.copy_to(t, pool, d, r);
      };
    }
    copier_ = std::move(copier);
    state_.resize(units_.size());
    if (!target_->host_backed()) {
      streams_.emplace(target_->torch_device.type());
      copy_stream_ = streams_->getStreamFromGlobalPool(target_->torch_device, false);
    }
    recompute_window();
  }

  residency_manager(const residency_manager&) = delete;
  residency_manager& operator=(const residency_manager&) = delete;

  ~residency_manager() {
    try {
      release_all();
    } catch (...) {  // a destructor must not throw; the bookings are released with the copies anyway
    }
  }

  const device_id& compute() const noexcept { return compute_; }
  std::size_t size() const noexcept { return units_.size(); }
  const residency_unit& unit(std::size_t i) const { return units_.at(i); }
  const std::vector<residency_unit>& units() const noexcept { return units_; }
  const device_pool& pool() const noexcept { return pool_; }
  const streaming_options& options() const noexcept { return options_; }

  /// True when unit `i` streams (its home is not the compute device).
  bool streams(std::size_t i) const { return units_.at(i).home != compute_; }

  /// Makes unit `i` resident on the compute device and marks it running; nested entries count.
  /// Throws `device_error` when its copy cannot be made (nothing stays booked then).
  void enter(std::size_t i) {
    std::lock_guard lock(mutex_);
    check_index(i, "entering unit");
    learn(i);
    auto& s = state_[i];
    if (streams(i) && !s.staged) {
      const auto start = clock::now();
      if (s.fetched.empty()) {
        ++stats_.prefetch_misses;
        fetch(i, false);
      } else {
        ++stats_.prefetch_hits;
      }
      if (s.ready) {
        if (!s.ready->query()) ++stats_.late_prefetches;
        s.ready->block(streams_->getStream(target_->torch_device));  // this unit's copy only
        s.ready.reset();
      }
      for (std::size_t t = 0; t < units_[i].handles.size(); ++t) units_[i].handles[t].set_data(s.fetched[t].data);
      s.staged = true;
      s.ahead = false;
      stats_.wait_seconds += seconds_since(start);
    }
    ++s.active;
    trace(residency_event_kind::enter, i);
    prefetch_after(i);
  }

  /// Marks unit `i` as no longer running; when nothing runs it any more, a streamed unit goes back
  /// to its home and its compute-device bytes are given back.
  void leave(std::size_t i) noexcept {
    std::lock_guard lock(mutex_);
    if (i >= units_.size() || state_[i].active == 0) return;
    trace(residency_event_kind::leave, i);
    if (--state_[i].active != 0 || !streams(i)) return;
    try {
      release(i);
    } catch (const std::exception& e) {  // leave runs in destructors: report, never throw
      log(log_level::error, "releasing unit '" + units_[i].name + "' failed: " + e.what());
    }
  }

  /// Fetches unit `i` ahead of use when it streams, is not fetched yet and fits the window.
  /// Returns whether a copy is now available or under way. Failing copies are dropped silently:
  /// the entry will fetch synchronously (and report the error) if it still cannot.
  bool prefetch(std::size_t i) {
    std::lock_guard lock(mutex_);
    check_index(i, "prefetching unit");
    return prefetch_unlocked(i);
  }

  /// Sends every streamed unit that is not running back home.
  void release_all() {
    std::lock_guard lock(mutex_);
    for (std::size_t i = 0; i < units_.size(); ++i)
      if (state_[i].active == 0 && !state_[i].fetched.empty()) release(i);
  }

  /// True while unit `i`'s handles point at a copy on the compute device (always for compute-homed units).
  bool resident(std::size_t i) const {
    std::lock_guard lock(mutex_);
    return !streams(i) || state_.at(i).staged;
  }
  /// True when unit `i` has a fetched copy on the compute device (staged or ahead of use).
  bool fetched(std::size_t i) const {
    std::lock_guard lock(mutex_);
    return !state_.at(i).fetched.empty();
  }
  bool running(std::size_t i) const {
    std::lock_guard lock(mutex_);
    return state_.at(i).active > 0;
  }
  bool any_running() const {
    std::lock_guard lock(mutex_);
    return std::any_of(state_.begin(), state_.end(), [](const unit_state& s) { return s.active > 0; });
  }

  /// Units in the order they first entered.
  std::vector<std::size_t> learned_order() const {
    std::lock_guard lock(mutex_);
    return order_;
  }
  /// Forgets the learned order (e.g. after the model's control flow changed).
  void forget_order() {
    std::lock_guard lock(mutex_);
    order_.clear();
    position_.clear();
  }

  streaming_stats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }
  void reset_stats() {
    std::lock_guard lock(mutex_);
    stats_ = {};
  }

  void set_prefetch_depth(std::size_t depth) {
    std::lock_guard lock(mutex_);
    options_.prefetch_depth = depth;
    recompute_window();
  }
  std::uint64_t window() const noexcept { return window_; }

  /// Receives every fetch, prefetch, enter, leave and release (under the manager's lock: keep it short).
  /// \code manager.set_trace([&](distorch::residency_event e) { log.push_back(e); }); \endcode
  void set_trace(std::function<void(residency_event)> trace) {
    std::lock_guard lock(mutex_);
    trace_ = std::move(trace);
  }

  /// Takes the units back out (all must be idle); the manager is empty afterwards. Used by the
  /// distributed module to re-home or unload units.
  std::vector<residency_unit> take_units() {
    std::lock_guard lock(mutex_);
    for (std::size_t i = 0; i < units_.size(); ++i)
      if (state_[i].active == 0 && !state_[i].fetched.empty()) release(i);
    if (std::any_of(state_.begin(), state_.end(), [](const unit_state& s) { return s.active > 0; }))
      throw placement_error({"taking units from the residency manager", compute_.str(), std::nullopt,
                             "a unit is still running", "move or unload units only between forward calls"});
    state_.clear();
    order_.clear();
    position_.clear();
    return std::move(units_);
  }

 private:
  using clock = std::chrono::steady_clock;
  static double seconds_since(clock::time_point start) {
    return std::chrono::duration<double>(clock::now() - start).count();
  }

  struct unit_state {
    std::vector<held_tensor> fetched;  // copies on the compute device
    std::optional<c10::Event> ready;   // stream devices: completion of those copies
    int active = 0;
    bool staged = false;  // handles point at `fetched`
    bool ahead = false;   // fetched by prefetch and not yet entered
  };

  void check_index(std::size_t i, const char* doing) const {
    if (i >= units_.size())
      throw placement_error({doing, std::to_string(i), error_position{"unit", i},
                             "there are only " + std::to_string(units_.size()) + " units",
                             "use an index from the model's inventory"});
  }

  void recompute_window() {
    std::uint64_t largest = 0;
    for (const auto& u : units_)
      if (u.home != compute_) largest = std::max(largest, u.bytes);
    window_ = options_.window != 0 ? options_.window : (options_.prefetch_depth + 1) * largest;
  }

  void trace(residency_event_kind kind, std::size_t i) {
    if (trace_) trace_({kind, i});
  }

  void learn(std::size_t i) {
    if (position_.count(i) != 0) return;
    position_.emplace(i, order_.size());
    order_.push_back(i);
  }

  std::uint64_t fetched_bytes() const {
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < units_.size(); ++i)
      if (!state_[i].fetched.empty()) total += units_[i].bytes;
    return total;
  }

  // Copies unit i to the compute device; on failure nothing stays booked.
  void fetch(std::size_t i, bool ahead) {
    auto& u = units_[i];
    auto& s = state_[i];
    const auto start = clock::now();
    const std::string doing = "fetching unit '" + u.name + "' to " + compute_.str();
    std::vector<held_tensor> copies;
    copies.reserve(u.home_data.size());
    const bool async = streams_.has_value();
    std::optional<c10::StreamGuard> on_copy_stream;
    if (async) on_copy_stream.emplace(*copy_stream_);
    for (const auto& h : u.home_data) copies.push_back(copier_(h.data, *target_, {false, async, doing}));
    if (async) {
      c10::Event ready(target_->torch_device.type());
      ready.record(*copy_stream_);
      s.ready.emplace(std::move(ready));
    }
    s.fetched = std::move(copies);
    s.ahead = ahead;
    stats_.fetches += 1;
    stats_.bytes_fetched += u.bytes;
    stats_.copy_seconds += seconds_since(start);
    trace(ahead ? residency_event_kind::prefetch : residency_event_kind::fetch, i);
  }

  bool prefetch_unlocked(std::size_t i) {
    if (!streams(i)) return true;
    auto& s = state_[i];
    if (!s.fetched.empty()) return true;
    if (fetched_bytes() + units_[i].bytes > window_) return false;
    try {
      fetch(i, true);
    } catch (const error&) {
      return false;
    }
    return true;
  }

  void prefetch_after(std::size_t i) {
    const std::size_t depth = options_.prefetch_depth;
    const std::size_t at = position_.at(i);
    // Copies ahead of use that the learned order no longer reaches soon are given back first, so
    // the window always holds what comes next.
    for (std::size_t j = 0; j < units_.size(); ++j) {
      if (j == i || state_[j].active > 0 || state_[j].fetched.empty() || !state_[j].ahead) continue;
      const auto p = position_.find(j);
      // A unit not in the learned order yet was prefetched by someone who knows better (a view).
      const bool upcoming = p == position_.end() || (p->second > at && p->second <= at + depth);
      if (!upcoming) release(j);
    }
    for (std::size_t k = 1; k <= depth && at + k < order_.size(); ++k)
      if (!prefetch_unlocked(order_[at + k])) break;
  }

  void release(std::size_t i) {
    auto& u = units_[i];
    auto& s = state_[i];
    if (s.staged)
      for (std::size_t t = 0; t < u.handles.size(); ++t) u.handles[t].set_data(u.home_data[t].data);
    if (streams_ && !s.fetched.empty()) {
      // Compute may still read the copies: the copy stream (whose pool the blocks return to)
      // waits for compute to pass this point before it may reuse them.
      c10::Event done(target_->torch_device.type());
      done.record(streams_->getStream(target_->torch_device));
      done.block(*copy_stream_);
    }
    s.fetched.clear();
    s.ready.reset();
    s.staged = false;
    s.ahead = false;
    ++stats_.releases;
    trace(residency_event_kind::release, i);
  }

  mutable std::mutex mutex_;
  device_pool pool_;
  device_id compute_;
  streaming_options options_;
  std::vector<residency_unit> units_;
  std::vector<unit_state> state_;
  const pool_device* target_ = nullptr;
  tensor_copier copier_;
  std::optional<c10::impl::VirtualGuardImpl> streams_;
  std::optional<c10::Stream> copy_stream_;
  std::uint64_t window_ = 0;
  std::vector<std::size_t> order_;
  std::unordered_map<std::size_t, std::size_t> position_;
  streaming_stats stats_;
  std::function<void(residency_event)> trace_;
};

}  // namespace distorch::inline v0
