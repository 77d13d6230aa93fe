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
/// - Inside a pass (`pass()`, opened by a distributed module around its forward) a unit that is
///   left stays staged until another unit enters, more room is needed, or the pass ends. A block
///   unit driven by the several `distorch::nn` layers inside it is then fetched once per pass,
///   not once per layer. Outside a pass, `leave` releases at once.
/// - A unit may carry `after_fetch` transforms (GGUF weights kept quantized at home, weights kept in
///   a narrower storage dtype): the fetched copy crosses the link as stored and is turned into what
///   the module computes with on the compute device, on the compute stream, when the unit is
///   staged. The books then hold the transformed tensor, not the copy, and the prefetch window
///   counts such a unit at `compute_bytes`, what it takes there once staged.
/// - With `staging_ring_bytes`, CPU homes stay pageable and are copied through a bounded host
///   staging ring (`staging_ring.hpp`), page-locked where the backend supports it.
/// - Copy time is the time the copies really took: on stream devices the time between timing
///   events around them where LibTorch can measure it (2.5 and later), else until the host first
///   sees them complete; on the CPU the host time of the synchronous copies.
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
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/core/log.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/memory/allocator.hpp"
#include "distorch/memory/pinned_host_allocator.hpp"
#include "distorch/runtime/device_pool.hpp"
#include "distorch/runtime/staging_ring.hpp"
#include "distorch/runtime/streaming_stats.hpp"
#include "distorch/runtime/unit_allocator.hpp"

namespace distorch::inline v0 {

/// How streaming behaves.
/// \code distorch::streaming_options o{.prefetch_depth = 2, .staging_ring_bytes = 64ull << 20}; \endcode
struct streaming_options {
  /// Units fetched ahead of the one running. 0 = fetch synchronously when a unit enters.
  std::size_t prefetch_depth = 1;
  /// Keep CPU homes in page-locked memory when the compute device reads them with async copies
  /// (only when that fits, see `choose_host_staging`; ignored while a staging ring is on).
  bool pinned_host = true;
  /// Most bytes of fetched (not compute-homed) units held on the compute device at once by
  /// prefetching; 0 = (prefetch_depth + 1) × the largest streamed unit. The unit that must run is
  /// always fetched, even beyond the window.
  std::uint64_t window = 0;
  /// Bytes of host memory for the staging ring through which CPU-homed units are fetched while
  /// their homes stay pageable; 0 = no ring. The ring never holds more than this.
  std::uint64_t staging_ring_bytes = 0;
  /// Slots the ring is split into: while the device reads one, the host fills the next.
  std::size_t staging_ring_slots = 2;
  /// Most host bytes `choose_host_staging` lets pinned homes take; 0 = half the host's RAM.
  std::uint64_t pinned_limit = 0;
};

/// What runs on the compute device after a fetch (see `residency_unit::after_fetch`).
/// \code distorch::fetch_transform dequant = [](const at::Tensor& q) { return q.to(at::kFloat).mul(0.01); }; \endcode
using fetch_transform = std::function<at::Tensor(const at::Tensor&)>;

/// One unit as the manager holds it: the module's tensor handles and their copies at home.
/// \code units.push_back({"blocks.0", distorch::device_id::cpu(), bytes, handles, std::move(home_copies)}); \endcode
struct residency_unit {
  std::string name;
  device_id home;
  std::uint64_t bytes = 0;
  std::vector<at::Tensor> handles;       ///< the module's own parameter / buffer tensors
  std::vector<held_tensor> home_data;    ///< one per handle: the bytes at home
  /// Run on the compute device after a fetch, one per handle: the handle then holds
  /// `after_fetch[h](fetched copy)` instead of the copy (e.g. GGUF units kept quantized at home and
  /// dequantized after the fetch, so fewer bytes cross the link).
  std::vector<std::function<at::Tensor(const at::Tensor&)>> after_fetch;  // empty, or one per handle (an empty function = none)
  /// Bytes the unit takes on the compute device once staged, after its `after_fetch` transforms
  /// (e.g. float32 of weights stored as float8); 0 = `bytes`. The prefetch window counts this.
  std::uint64_t compute_bytes = 0;
};

/// What happened, for tracing and tests.
/// \code if (e.kind == distorch::residency_event_kind::prefetch) ++prefetches; \endcode
enum class residency_event_kind : std::uint8_t { fetch, prefetch, enter, leave, release };

/// One traced event: what happened to which unit.
/// \code manager.set_trace([&](distorch::residency_event e) { seen.push_back(e.unit); }); \endcode
struct residency_event {
  residency_event_kind kind;
  std::size_t unit;
};

/// Copies a tensor to a pool device with booking; the manager's view of the allocator.
/// \code distorch::tensor_copier c = [](auto& t, auto& d, auto& r) { return distorch::booked_copy_allocator{}.copy_to(t, pool, d, r); }; \endcode
using tensor_copier = std::function<held_tensor(const at::Tensor&, const pool_device&, const copy_request&)>;

/// See the file comment.
/// \code distorch::residency_manager manager(pool, distorch::device_id::sim(0), std::move(units)); \endcode
class residency_manager {
 public:
  /// Takes the units (already at their homes; handles pointing at `home_data`, or at the resident
  /// copy for compute-homed units). `copier` defaults to `booked_copy_allocator`. With
  /// `options.staging_ring_bytes` set and units homed on `cpu`, the ring is made here (page-locked
  /// when the compute device is a CUDA device, plain host memory otherwise) and booked on the
  /// pool's `cpu` device when the pool has one. Throws `device_error` when a unit's `after_fetch`
  /// has the wrong length or the ring cannot be made.
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
    for (const auto& u : units_)
      if (!u.after_fetch.empty() && u.after_fetch.size() != u.handles.size())
        throw device_error({"preparing unit '" + u.name + "' for streaming", u.name, std::nullopt,
                            "it has " + std::to_string(u.handles.size()) + " tensors but " +
                                std::to_string(u.after_fetch.size()) + " after-fetch transforms",
                            "give no transforms, or one per tensor (an empty function for none)"});
    state_.resize(units_.size());
    if (!target_->host_backed()) {
      streams_.emplace(target_->torch_device.type());
      copy_stream_ = streams_->getStreamFromGlobalPool(target_->torch_device, false);
    }
    make_ring();
    recompute_window();
  }

  residency_manager(const residency_manager&) = delete;
  residency_manager& operator=(const residency_manager&) = delete;

  ~residency_manager() {
    try {
      release_all();
      if (ring_) ring_->drain();
    } catch (...) {  // a destructor must not throw; the bookings are released with the copies anyway
    }
  }

  /// The device units are fetched to. \code manager.compute().str(); \endcode
  const device_id& compute() const noexcept { return compute_; }
  /// Number of units. \code for (std::size_t i = 0; i < manager.size(); ++i) manager.unit(i).name; \endcode
  std::size_t size() const noexcept { return units_.size(); }
  /// Unit `i` (its handles, home and home copies). \code manager.unit(3).home; \endcode
  const residency_unit& unit(std::size_t i) const { return units_.at(i); }
  /// Every unit, in inventory order. \code for (const auto& u : manager.units()) u.bytes; \endcode
  const std::vector<residency_unit>& units() const noexcept { return units_; }
  /// The devices the manager books on. \code manager.pool().used(manager.compute()); \endcode
  const device_pool& pool() const noexcept { return pool_; }
  /// The options it streams with. \code manager.options().prefetch_depth; \endcode
  const streaming_options& options() const noexcept { return options_; }

  /// True when unit `i` streams (its home is not the compute device).
  /// \code if (manager.streams(3)) manager.prefetch(3); \endcode
  bool streams(std::size_t i) const { return units_.at(i).home != compute_; }

  /// Makes unit `i` resident on the compute device and marks it running; nested entries count.
  /// Entering releases units left staged earlier in the pass. Throws `device_error` when its copy
  /// (or its after-fetch transform) cannot be made; nothing stays booked then.
  /// \code manager.enter(3); \endcode
  void enter(std::size_t i) {
    std::lock_guard lock(mutex_);
    check_index(i, "entering unit");
    learn(i);
    release_lingering(i);
    harvest_copy_times(false);
    auto& s = state_[i];
    if (streams(i) && s.lingering) {
      s.lingering = false;  // still staged from an earlier entry in this pass: nothing to copy
      ++stats_.reentries;
    } else if (streams(i) && !s.staged) {
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
      try {
        stage(i);
      } catch (...) {
        release(i);
        throw;
      }
      stats_.wait_seconds += seconds_since(start);
    }
    ++s.active;
    trace(residency_event_kind::enter, i);
    prefetch_after(i);
  }

  /// Marks unit `i` as no longer running. When nothing runs it any more, a streamed unit goes back
  /// to its home and its compute-device bytes are given back; inside a pass it stays staged until
  /// another unit enters or the pass ends.
  /// \code manager.leave(3); \endcode
  void leave(std::size_t i) noexcept {
    std::lock_guard lock(mutex_);
    if (i >= units_.size() || state_[i].active == 0) return;
    trace(residency_event_kind::leave, i);
    if (--state_[i].active != 0 || !streams(i)) return;
    if (passes_ > 0 && state_[i].staged) {
      state_[i].lingering = true;
      return;
    }
    try {
      release(i);
    } catch (const std::exception& e) {  // leave runs in destructors: report, never throw
      log(log_level::error, "releasing unit '" + units_[i].name + "' failed: " + e.what());
    }
  }

  /// Ends a pass when destroyed; see `pass()`.
  /// \code { auto pass = manager.pass(); run(); }   // the pass ends here \endcode
  class pass_scope {
   public:
    /// Begins a pass on `m` (`residency_manager::begin_pass`).
    explicit pass_scope(residency_manager& m) : m_(&m) { m_->begin_pass(); }
    pass_scope(pass_scope&& other) noexcept : m_(std::exchange(other.m_, nullptr)) {}
    pass_scope(const pass_scope&) = delete;
    pass_scope& operator=(const pass_scope&) = delete;
    pass_scope& operator=(pass_scope&&) = delete;
    ~pass_scope() {
      if (m_) m_->end_pass();
    }

   private:
    residency_manager* m_;
  };

  /// Opens a pass (one forward call) for the lifetime of the returned scope. Inside it a unit
  /// that is left stays staged until another unit enters, room is needed, or the pass ends, so a
  /// unit re-entered by several layers in a row is fetched once. Passes nest.
  /// \code
  ///   auto pass = manager.pass();
  ///   model->forward(x);   // each block fetched once, however many of its layers enter it
  /// \endcode
  [[nodiscard]] pass_scope pass() { return pass_scope(*this); }

  /// Opens a pass by hand; pair with `end_pass()`. Prefer `pass()`.
  /// \code manager.begin_pass(); run(); manager.end_pass(); \endcode
  void begin_pass() {
    std::lock_guard lock(mutex_);
    ++passes_;
  }
  /// Closes a pass; when the outermost pass closes, every unit left staged goes home.
  /// \code manager.end_pass(); \endcode
  void end_pass() noexcept {
    std::lock_guard lock(mutex_);
    if (passes_ == 0 || --passes_ != 0) return;
    try {
      release_lingering(units_.size());
    } catch (const std::exception& e) {
      log(log_level::error, std::string("ending a streaming pass failed: ") + e.what());
    }
  }
  /// True while a pass is open. \code CHECK(!manager.in_pass()); \endcode
  bool in_pass() const {
    std::lock_guard lock(mutex_);
    return passes_ > 0;
  }

  /// Fetches unit `i` ahead of use when it streams, is not fetched yet and fits the window.
  /// Returns whether a copy is now available or under way. Failing copies are dropped silently:
  /// the entry will fetch synchronously (and report the error) if it still cannot.
  /// \code manager.prefetch(4); \endcode
  bool prefetch(std::size_t i) {
    std::lock_guard lock(mutex_);
    check_index(i, "prefetching unit");
    return prefetch_unlocked(i);
  }

  /// Sends every streamed unit that is not running back home.
  /// \code manager.release_all(); \endcode
  void release_all() {
    std::lock_guard lock(mutex_);
    for (std::size_t i = 0; i < units_.size(); ++i)
      if (state_[i].active == 0 && !state_[i].fetched.empty()) release(i);
  }

  /// True while unit `i`'s handles point at a copy on the compute device (always for compute-homed units).
  /// \code CHECK(manager.resident(3)); \endcode
  bool resident(std::size_t i) const {
    std::lock_guard lock(mutex_);
    return !streams(i) || state_.at(i).staged;
  }
  /// True when unit `i` has a fetched copy on the compute device (staged or ahead of use).
  /// \code CHECK(manager.fetched(4));   // prefetched \endcode
  bool fetched(std::size_t i) const {
    std::lock_guard lock(mutex_);
    return !state_.at(i).fetched.empty();
  }
  /// True while unit `i` has been entered and not yet left. \code CHECK(manager.running(3)); \endcode
  bool running(std::size_t i) const {
    std::lock_guard lock(mutex_);
    return state_.at(i).active > 0;
  }
  /// True while any unit runs. \code CHECK(!manager.any_running()); \endcode
  bool any_running() const {
    std::lock_guard lock(mutex_);
    return std::any_of(state_.begin(), state_.end(), [](const unit_state& s) { return s.active > 0; });
  }
  /// Bytes the fetched copies of unit `i` hold on the compute device now (0 when not fetched).
  /// \code manager.held_bytes(3); \endcode
  std::uint64_t held_bytes(std::size_t i) const {
    std::lock_guard lock(mutex_);
    return held(state_.at(i));
  }

  /// Units in the order they first entered.
  /// \code auto order = manager.learned_order(); \endcode
  std::vector<std::size_t> learned_order() const {
    std::lock_guard lock(mutex_);
    return order_;
  }
  /// Forgets the learned order (e.g. after the model's control flow changed).
  /// \code manager.forget_order(); \endcode
  void forget_order() {
    std::lock_guard lock(mutex_);
    order_.clear();
    position_.clear();
  }

  /// What the manager did since the last reset. On stream devices this waits for copies still in
  /// flight, so that their copy time is known.
  /// \code std::cout << manager.stats().str(); \endcode
  streaming_stats stats() const {
    std::lock_guard lock(mutex_);
    harvest_copy_times(true);
    streaming_stats out = stats_;
    if (ring_) {
      out.ring_chunks = ring_->stats().chunks - ring_base_.chunks;
      out.ring_bytes = ring_->stats().bytes - ring_base_.bytes;
    }
    return out;
  }
  /// Starts the statistics from zero. \code manager.reset_stats(); \endcode
  void reset_stats() {
    std::lock_guard lock(mutex_);
    harvest_copy_times(true);
    stats_ = {};
    if (ring_) ring_base_ = ring_->stats();
  }

  /// The host staging ring, or null when there is none.
  /// \code if (auto* r = manager.ring()) std::cout << r->bytes(); \endcode
  const staging_ring* ring() const noexcept { return ring_ ? &*ring_ : nullptr; }

  /// Changes how many units are fetched ahead (and the default window with it).
  /// \code manager.set_prefetch_depth(2); \endcode
  void set_prefetch_depth(std::size_t depth) {
    std::lock_guard lock(mutex_);
    options_.prefetch_depth = depth;
    recompute_window();
  }
  /// Most bytes prefetching may hold on the compute device. \code manager.window(); \endcode
  std::uint64_t window() const noexcept { return window_; }

  /// Receives every fetch, prefetch, enter, leave and release (under the manager's lock: keep it short).
  /// \code manager.set_trace([&](distorch::residency_event e) { log.push_back(e); }); \endcode
  void set_trace(std::function<void(residency_event)> trace) {
    std::lock_guard lock(mutex_);
    trace_ = std::move(trace);
  }

  /// Takes the units back out (all must be idle); the manager is empty afterwards. Used by the
  /// distributed module to re-home or unload units.
  /// \code auto units = manager.take_units(); \endcode
  std::vector<residency_unit> take_units() {
    std::lock_guard lock(mutex_);
    for (std::size_t i = 0; i < units_.size(); ++i)
      if (state_[i].active == 0 && !state_[i].fetched.empty()) release(i);
    if (std::any_of(state_.begin(), state_.end(), [](const unit_state& s) { return s.active > 0; }))
      throw placement_error({"taking units from the residency manager", compute_.str(), std::nullopt,
                             "a unit is still running", "move or unload units only between forward calls"});
    if (ring_) ring_->drain();
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
    std::vector<held_tensor> fetched;  // on the compute device: the copies, then (staged) what the handles hold
    std::optional<c10::Event> ready;   // stream devices: completion of those copies
    int active = 0;
    bool staged = false;     // handles point at `fetched`
    bool ahead = false;      // fetched by prefetch and not yet entered
    bool lingering = false;  // staged, not running, kept for re-entry within the pass
  };

  // One fetch's copies on a stream device, timed once they have completed.
  struct copy_timing {
    clock::time_point host_start;
    c10::Event start;
    c10::Event end;
  };

  static std::uint64_t held(const unit_state& s) {
    std::uint64_t total = 0;
    for (const auto& h : s.fetched) total += h.booked.bytes();
    return total;
  }

  static std::uint64_t home_copy_bytes(const residency_unit& u) {
    std::uint64_t total = 0;
    for (const auto& h : u.home_data) total += static_cast<std::uint64_t>(h.data.numel()) * h.data.element_size();
    return total;
  }

  void check_index(std::size_t i, const char* doing) const {
    if (i >= units_.size())
      throw placement_error({doing, std::to_string(i), error_position{"unit", i},
                             "there are only " + std::to_string(units_.size()) + " units",
                             "use an index from the model's inventory"});
  }

  void recompute_window() {
    std::uint64_t largest = 0;
    for (const auto& u : units_)
      if (u.home != compute_) largest = std::max({largest, u.bytes, u.compute_bytes});
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
    for (const auto& s : state_) total += held(s);
    return total;
  }

  bool uses_ring(std::size_t i) const { return ring_.has_value() && units_[i].home.is_cpu(); }

  void make_ring() {
    if (options_.staging_ring_bytes == 0 || compute_.is_cpu()) return;
    if (std::none_of(units_.begin(), units_.end(), [](const residency_unit& u) { return u.home.is_cpu(); })) return;
    const std::size_t slots = options_.staging_ring_slots;
    // Booked before allocating, so a ring that does not fit the host's books is refused up front.
    if (slots != 0 && options_.staging_ring_bytes >= slots && pool_.contains(device_id::cpu()))
      ring_booking_ = pool_.reserve(device_id::cpu(), options_.staging_ring_bytes / slots * slots, "making the host staging ring");
    if (target_->torch_device.type() == c10::DeviceType::CUDA && pinned_available()) {
      pinned_host_allocator pinned;
      ring_.emplace(pinned, options_.staging_ring_bytes, slots);
    } else {  // copies from a CPU-backed device are synchronous: pageable slots serve as well
      device_allocator host(device_id::cpu());
      ring_.emplace(host, options_.staging_ring_bytes, slots);
    }
  }

  // Copies one CPU-homed tensor through the ring into a booked tensor on the compute device.
  held_tensor ring_copy(const at::Tensor& source, const std::string& doing) {
    const auto bytes = static_cast<std::uint64_t>(source.numel()) * source.element_size();
    reservation booked = pool_.reserve(compute_, bytes, doing);
    at::Tensor out;
    try {
      out = at::empty(source.sizes(), source.options().device(target_->torch_device));
    } catch (const c10::Error& e) {
      throw device_error({doing, compute_.str(), std::nullopt,
                          "LibTorch could not allocate " + format_bytes(bytes) + ": " + e.what_without_backtrace(),
                          "place less on " + compute_.str() + " or free memory there"});
    }
    // Homes are made contiguous; a strided one is packed first (a transient pageable copy).
    ring_->copy(source.is_contiguous() ? source : source.contiguous(), out, copy_stream_);
    return {std::move(out), std::move(booked)};
  }

  // Copies unit i to the compute device; on failure nothing stays booked.
  void fetch(std::size_t i, bool ahead) {
    auto& u = units_[i];
    auto& s = state_[i];
    const auto host_start = clock::now();
    const std::string doing = "fetching unit '" + u.name + "' to " + compute_.str();
    std::vector<held_tensor> copies;
    copies.reserve(u.home_data.size());
    const bool async = streams_.has_value();
    std::optional<c10::StreamGuard> on_copy_stream;
    std::optional<copy_timing> timing;
    if (async) {
      on_copy_stream.emplace(*copy_stream_);
      const auto type = target_->torch_device.type();
      // BACKEND_DEFAULT: timing-capable events (LibTorch's default ones disable timing on CUDA).
      timing.emplace(copy_timing{host_start, c10::Event(type, c10::EventFlag::BACKEND_DEFAULT),
                                 c10::Event(type, c10::EventFlag::BACKEND_DEFAULT)});
      timing->start.record(*copy_stream_);
    }
    const bool through_ring = uses_ring(i);
    for (const auto& h : u.home_data)
      copies.push_back(through_ring ? ring_copy(h.data, doing) : copier_(h.data, *target_, {false, async, doing}));
    if (async) {
      c10::Event ready(target_->torch_device.type());
      ready.record(*copy_stream_);
      s.ready.emplace(std::move(ready));
      timing->end.record(*copy_stream_);
      timings_.push_back(std::move(*timing));
    } else {
      stats_.copy_seconds += seconds_since(host_start);
    }
    s.fetched = std::move(copies);
    s.ahead = ahead;
    stats_.fetches += 1;
    stats_.bytes_fetched += home_copy_bytes(u);
    trace(ahead ? residency_event_kind::prefetch : residency_event_kind::fetch, i);
  }

  // Points the handles of unit i at its fetched copies, after running its after-fetch transforms
  // on the compute stream (the caller has made that stream wait for the copies).
  void stage(std::size_t i) {
    auto& u = units_[i];
    auto& s = state_[i];
    if (!u.after_fetch.empty()) {
      std::vector<held_tensor> copies;  // raw copies replaced below; dropped once compute has read them
      try {
        for (std::size_t t = 0; t < u.handles.size(); ++t) {
          if (!u.after_fetch[t]) continue;
          held_tensor next = transform(i, t);
          copies.push_back(std::exchange(s.fetched[t], std::move(next)));
        }
      } catch (...) {
        compute_passed_here();
        throw;
      }
      // The transforms read the copies on the compute stream; their blocks belong to the copy
      // stream, which must not reuse them before compute has passed this point.
      if (!copies.empty()) compute_passed_here();
    }
    for (std::size_t t = 0; t < u.handles.size(); ++t) u.handles[t].set_data(s.fetched[t].data);
    s.staged = true;
    s.ahead = false;
  }

  held_tensor transform(std::size_t i, std::size_t t) {
    auto& u = units_[i];
    auto& copy = state_[i].fetched[t];
    const std::string doing = "transforming tensor " + std::to_string(t) + " of unit '" + u.name + "' after its fetch";
    at::Tensor out;
    try {
      out = u.after_fetch[t](copy.data);
    } catch (const error&) {
      throw;
    } catch (const c10::Error& e) {
      std::string why = e.what_without_backtrace();
      throw device_error({doing, u.name, error_position{"tensor", t}, "the transform failed: " + why.substr(0, why.find('\n')),
                          "check the unit's after-fetch transform against the tensor it receives"});
    } catch (const std::exception& e) {
      throw device_error({doing, u.name, error_position{"tensor", t}, std::string("the transform failed: ") + e.what(),
                          "check the unit's after-fetch transform against the tensor it receives"});
    }
    if (!out.defined() || out.device() != copy.data.device())
      throw device_error({doing, u.name, error_position{"tensor", t},
                          out.defined() ? "the transform returned a tensor on " + out.device().str() + ", not on the compute device"
                                        : "the transform returned an undefined tensor",
                          "return a tensor on the device of the fetched copy it receives"});
    if (out.storage().is_alias_of(copy.data.storage())) return {std::move(out), std::move(copy.booked)};
    const auto bytes = static_cast<std::uint64_t>(out.storage().nbytes());
    return {std::move(out), pool_.reserve(compute_, bytes, doing)};
  }

  bool prefetch_unlocked(std::size_t i) {
    if (!streams(i)) return true;
    auto& s = state_[i];
    if (!s.fetched.empty()) return true;
    // A transformed unit grows to compute_bytes when it is staged: the window must hold that.
    const std::uint64_t need = std::max(home_copy_bytes(units_[i]), units_[i].compute_bytes);
    if (fetched_bytes() + need > window_) {
      release_lingering(i);  // idle units kept for re-entry give way to what comes next
      if (fetched_bytes() + need > window_) return false;
    }
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

  // Releases every unit kept staged for re-entry, except `keep`.
  void release_lingering(std::size_t keep) {
    for (std::size_t j = 0; j < units_.size(); ++j)
      if (j != keep && state_[j].lingering) release(j);
  }

  // Adds the copy time of completed fetches on stream devices (all of them with `wait`).
  void harvest_copy_times(bool wait) const {
    for (auto it = timings_.begin(); it != timings_.end();) {
      if (wait) detail::wait_for_event(it->end);
      if (!it->end.query()) {
        ++it;
        continue;
      }
      stats_.copy_seconds += copy_duration(*it);
      it = timings_.erase(it);
    }
  }

  static double copy_duration(const copy_timing& t) {
#if DISTORCH_TORCH_EVENT_TIMING
    try {
      return t.start.elapsedTime(t.end) / 1000.0;  // milliseconds between the events on the copy stream
    } catch (const c10::Error&) {  // a backend without event timing: when the host saw the copy done
    }
#endif
    return seconds_since(t.host_start);
  }

  // Stream devices: nothing queued on the copy stream from now on runs before compute has reached
  // this point, so blocks compute may still read are not reused by a new copy.
  void compute_passed_here() {
    if (!streams_) return;
    c10::Event done(target_->torch_device.type());
    done.record(streams_->getStream(target_->torch_device));
    done.block(*copy_stream_);
  }

  void release(std::size_t i) {
    auto& u = units_[i];
    auto& s = state_[i];
    if (s.staged)
      for (std::size_t t = 0; t < u.handles.size(); ++t) u.handles[t].set_data(u.home_data[t].data);
    // Compute may still read the copies: the copy stream (whose pool the blocks return to) waits
    // for compute to pass this point before it may reuse them.
    if (!s.fetched.empty()) compute_passed_here();
    s.fetched.clear();
    s.ready.reset();
    s.staged = false;
    s.ahead = false;
    s.lingering = false;
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
  reservation ring_booking_;
  std::optional<staging_ring> ring_;
  staging_ring_stats ring_base_;
  std::uint64_t window_ = 0;
  std::vector<std::size_t> order_;
  std::unordered_map<std::size_t, std::size_t> position_;
  int passes_ = 0;
  mutable std::vector<copy_timing> timings_;
  mutable streaming_stats stats_;
  std::function<void(residency_event)> trace_;
};

}  // namespace distorch::inline v0
