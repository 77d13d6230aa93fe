#pragma once
/// \file
/// `residency_manager`: keeps each unit's weights where compute needs them. Units homed on the
/// compute device stay resident. A unit homed elsewhere is fetched to the compute device before it
/// runs (`enter`) and released after (`leave`): every parameter handle the model holds is switched
/// in place with `Tensor::set_data`, so the model sees the fetched copy without knowing.
///
/// Why it is built this way:
/// - The execution order is not known in C++ (modules have no hooks), so it is learned: the
///   sequence in which streamed units enter during the first pass (or, without passes, until the
///   first unit enters again) is recorded, repeats included. Later entries follow it with a
///   cursor and prefetch the `depth` entries after it, within a byte window. The order is cyclic:
///   the end of one forward prefetches the first units of the next. An entry off the order
///   resynchronises the cursor (a changed order costs misses, never wrong weights); a unit the
///   order does not know starts learning afresh. Each `enter` costs O(depth) on the host: it looks
///   only at the cursor, the next `depth` entries, and the few units fetched ahead or kept staged.
/// - On stream devices (CUDA, XPU, ...) copies are queued on a side stream taken from the device
///   guard interface (`c10::impl::VirtualGuardImpl`), so one code path serves every backend. The
///   compute stream waits on the unit's own event, never on the whole copy stream. A release
///   records an event on the compute stream and makes the copy stream wait on it before anything
///   else is queued there: the caching allocator then cannot hand the released block to a new copy
///   while compute may still read it.
/// - A device whose backend has no stream pool (MPS, say) gets synchronous copies and one warning
///   (`detail::copy_stream_for`) instead of an error.
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
/// - Strict simulated devices (`streaming_options::strict`, on by default): on a simulated
///   compute device the handles of a streamed unit point, between uses, at a tripwire over the
///   home copy's storage (runtime/detail/tripwire.hpp), so computing with a unit that was never
///   staged is a `device_error` naming it, as it would be a device mismatch on a GPU.
/// - Several threads or streams may run units at once. On stream devices every stream that enters
///   a unit waits on that unit's copy event, and a release fences every stream that read it.
/// - Buffers are written back, not kept resident: at release, a buffer whose version counter moved
///   since the unit was staged (an in-place write through the handle: a cache, a step counter),
///   every buffer of a unit whose modules train (BatchNorm's running statistics, which LibTorch 1.13
///   updates without a version bump), and every buffer made under `c10::InferenceMode` (such
///   tensors have no version counter) is copied back into its home copy before the handle leaves
///   the fetched one. The copy is synchronous; units whose buffers nothing writes pay nothing.
///   Keeping such units resident instead would pin them to the compute device whatever the plan
///   says (docs/design.md, "Buffers written by forward").
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
#include <ATen/ops/empty_strided.h>
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
#include "distorch/runtime/detail/tripwire.hpp"
#include "distorch/runtime/device_pool.hpp"
#include "distorch/runtime/staging_ring.hpp"
#include "distorch/runtime/streaming_stats.hpp"
#include "distorch/runtime/unit_allocator.hpp"

namespace distorch::inline v0 {

namespace detail {

/// A side stream for copies to `device` from its backend's stream pool, or nullopt when the
/// backend has none (MPS, a guard without a stream pool): copies to that device are then
/// synchronous, said once per device in a warning, instead of an error.
/// \code auto s = distorch::detail::copy_stream_for(c10::Device(c10::DeviceType::CUDA, 0), "cuda:0"); \endcode
inline std::optional<c10::Stream> copy_stream_for(const c10::Device& device, const std::string& name) {
  try {
    c10::impl::VirtualGuardImpl guard(device.type());
    return guard.getStreamFromGlobalPool(device, false);
  } catch (const c10::Error& e) {
    static std::mutex mutex;
    static std::vector<std::string> told;
    std::lock_guard lock(mutex);
    if (std::find(told.begin(), told.end(), name) == told.end()) {
      told.push_back(name);
      const std::string why = e.what_without_backtrace();
      log(log_level::warning, "distorch: " + name + " has no stream pool (" + why.substr(0, why.find('\n')) +
                                  "); copies to it are synchronous, without overlap");
    }
    return std::nullopt;
  }
}

}  // namespace detail

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
  /// On a simulated compute device, point the handles of units that are not staged at a tripwire
  /// that makes any op on them a `device_error` naming the unit (what a device mismatch is on a
  /// GPU). Ignored on real devices, where the mismatch itself is the error.
  bool strict = true;
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
  /// Empty, or one per handle: true for a buffer. A buffer that `forward` changed on the compute
  /// device is copied back into its home copy when the unit is released (see the file comment).
  std::vector<bool> buffers;
  /// True while the modules holding the unit's buffers train (their buffers are then written back
  /// at every release, whatever their version counters say); empty = never.
  std::function<bool()> training;
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
    if (!target_->host_backed())
      if ((copy_stream_ = detail::copy_stream_for(target_->torch_device, compute_.str()))) streams_.emplace(target_->torch_device.type());
    make_ring();
    recompute_window();
    strict_ = options_.strict && target_->simulated;
    if (strict_)
      for (std::size_t i = 0; i < units_.size(); ++i) {
        if (!streams(i)) continue;
        auto& u = units_[i];
        for (std::size_t t = 0; t < u.handles.size(); ++t) {
          state_[i].wires.push_back(detail::make_tripwire(u.home_data[t].data, u.name, compute_.str()));
          u.handles[t].set_data(state_[i].wires.back());
        }
      }
  }

  residency_manager(const residency_manager&) = delete;
  residency_manager& operator=(const residency_manager&) = delete;

  ~residency_manager() {
    trace_ = nullptr;  // the trace's receiver may be gone already; releases at destruction are not traced
    try {
      release_all();
      if (ring_) ring_->drain();
      disarm();
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
    track(i);
    release_lingering(i);
    harvest_copy_times(false);
    auto& s = state_[i];
    if (streams(i) && s.lingering) {
      s.lingering = false;  // still staged from an earlier entry in this pass: nothing to copy
      drop(lingering_, i);
      ++stats_.reentries;
      wait_for_copy(i);
    } else if (streams(i) && !s.staged) {
      const auto start = clock::now();
      if (s.fetched.empty()) {
        ++stats_.prefetch_misses;
        fetch(i, false);
      } else {
        ++stats_.prefetch_hits;
      }
      if (s.ready && !s.ready->query()) ++stats_.late_prefetches;
      wait_for_copy(i);
      try {
        stage(i);
      } catch (...) {
        release(i);
        throw;
      }
      stats_.wait_seconds += seconds_since(start);
    } else if (streams(i)) {
      wait_for_copy(i);  // staged for another thread or stream: this stream waits on the copy too
    }
    ++s.active;
    trace(residency_event_kind::enter, i);
    prefetch_ahead();
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
      lingering_.push_back(i);
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
      last_entered_ = units_.size();
      // The first pass taught the order; from its end on, the next pass's first units come ahead.
      if (learning_ && !order_.empty()) learning_ = false;
      prefetch_ahead();
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
    const bool fresh = streams(i) && state_[i].fetched.empty();
    const bool available = prefetch_unlocked(i);
    if (fresh && available) state_[i].by_caller = true;
    return available;
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

  /// The learned order: streamed units in the sequence they entered in one pass (a unit run
  /// twice appears twice; consecutive entries of one unit once).
  /// \code auto order = manager.learned_order(); \endcode
  std::vector<std::size_t> learned_order() const {
    std::lock_guard lock(mutex_);
    return order_;
  }
  /// True until a whole pass has been learned. \code CHECK(!manager.learning()); \endcode
  bool learning() const {
    std::lock_guard lock(mutex_);
    return learning_;
  }
  /// Forgets the learned order; the next pass learns it again (it also re-learns by itself when
  /// a unit it does not know enters). \code manager.forget_order(); \endcode
  void forget_order() {
    std::lock_guard lock(mutex_);
    reset_order();
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

  /// Receives every fetch, prefetch, enter, leave and release (under the manager's lock: keep it
  /// short), except the releases the destructor makes.
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
    disarm();
    state_.clear();
    reset_order();
    fetched_.clear();
    ahead_.clear();
    lingering_.clear();
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
    std::vector<c10::Stream> readers;  // stream devices: every compute stream that entered since the fetch
    std::vector<at::Tensor> wires;     // strict mode: what the handles hold between uses
    std::vector<std::int64_t> versions;  // per handle: its version counter when staged (buffers only)
    int active = 0;
    bool staged = false;     // handles point at `fetched`
    bool ahead = false;      // fetched by prefetch and not yet entered
    bool lingering = false;  // staged, not running, kept for re-entry within the pass
    bool by_caller = false;  // fetched ahead by prefetch() (a view knows what comes next), not by the order
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

  static void drop(std::vector<std::size_t>& list, std::size_t i) {
    const auto it = std::find(list.begin(), list.end(), i);
    if (it != list.end()) list.erase(it);
  }

  void reset_order() {
    order_.clear();
    positions_.clear();
    cursor_ = 0;
    last_entered_ = static_cast<std::size_t>(-1);
    learning_ = true;
  }

  void append_to_order(std::size_t i) {
    positions_[i].push_back(order_.size());
    order_.push_back(i);
    cursor_ = order_.size() - 1;
  }

  // Records the order while learning, else moves the cursor along it (see the file comment).
  void track(std::size_t i) {
    const bool again = i == last_entered_;  // re-entered by the next layer of the same unit, or nested
    last_entered_ = i;
    if (again || !streams(i)) return;
    if (learning_) {
      if (passes_ == 0 && order_.size() > 1 && order_.front() == i) {  // no passes: the cycle closed
        learning_ = false;
        cursor_ = 0;
        return;
      }
      append_to_order(i);
      return;
    }
    const std::size_t next = (cursor_ + 1) % order_.size();
    if (order_[next] == i) {
      cursor_ = next;
      return;
    }
    const auto known = positions_.find(i);
    if (known == positions_.end()) {  // a unit the order has never seen: the call sequence changed
      reset_order();
      last_entered_ = i;
      append_to_order(i);
      return;
    }
    const auto& at = known->second;  // off the order: resynchronise at its next position
    const auto later = std::upper_bound(at.begin(), at.end(), cursor_);
    cursor_ = later != at.end() ? *later : at.front();
  }

  std::uint64_t fetched_bytes() const {
    std::uint64_t total = 0;
    for (const auto j : fetched_) total += held(state_[j]);
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
    const bool dense = source.is_non_overlapping_and_dense();
    try {
      const auto options = source.options().device(target_->torch_device);
      out = dense ? at::empty_strided(source.sizes(), source.strides(), options) : at::empty(source.sizes(), options);
    } catch (const c10::Error& e) {
      throw device_error({doing, compute_.str(), std::nullopt,
                          "LibTorch could not allocate " + format_bytes(bytes) + ": " + e.what_without_backtrace(),
                          "place less on " + compute_.str() + " or free memory there"});
    }
    // A dense home (contiguous or channels_last alike) travels as the bytes it spans, into a copy
    // with the same strides; any other one is packed first (a transient pageable copy).
    if (dense) ring_->copy(detail::dense_span(source), detail::dense_span(out), copy_stream_);
    else ring_->copy(source.contiguous(), out, copy_stream_);
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
    fetched_.push_back(i);
    if (ahead) ahead_.push_back(i);
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
    if (!u.buffers.empty()) {
      s.versions.assign(u.handles.size(), -1);
      for (std::size_t t = 0; t < u.handles.size(); ++t)
        if (u.buffers[t]) s.versions[t] = version_of(u.handles[t]);
    }
    s.staged = true;
    if (s.ahead) drop(ahead_, i);
    s.ahead = false;
    s.by_caller = false;
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

  // Prefetches the `depth` entries after the cursor (cyclically once the order is learned), after
  // giving back copies fetched ahead that the order no longer reaches soon.
  void prefetch_ahead() {
    const std::size_t n = order_.size();
    if (n == 0) return;
    const std::size_t depth = options_.prefetch_depth;
    std::vector<std::size_t> upcoming;
    for (std::size_t k = 1; k <= depth && (!learning_ || cursor_ + k < n); ++k) {
      const std::size_t u = order_[(cursor_ + k) % n];
      if (std::find(upcoming.begin(), upcoming.end(), u) == upcoming.end()) upcoming.push_back(u);
    }
    // Copies the order fetched ahead and no longer reaches soon go; those a caller asked for (a
    // view, which knows what comes next) stay until entered.
    for (const std::size_t j : std::vector<std::size_t>(ahead_))
      if (!state_[j].by_caller && std::find(upcoming.begin(), upcoming.end(), j) == upcoming.end()) release(j);
    for (const std::size_t u : upcoming)
      if (!prefetch_unlocked(u)) break;
  }

  // Releases every unit kept staged for re-entry, except `keep`.
  void release_lingering(std::size_t keep) {
    if (lingering_.empty()) return;
    for (const std::size_t j : std::vector<std::size_t>(lingering_))
      if (j != keep) release(j);
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
    stream_passed_here(streams_->getStream(target_->torch_device));
  }

  void stream_passed_here(const c10::Stream& reader) {
    c10::Event done(target_->torch_device.type());
    done.record(reader);
    done.block(*copy_stream_);
  }

  // Stream devices: the calling thread's current stream waits on unit i's copies (never on the
  // whole copy stream) and is remembered, so the release fences it too.
  void wait_for_copy(std::size_t i) {
    if (!streams_) return;
    auto& s = state_[i];
    const c10::Stream current = streams_->getStream(target_->torch_device);
    if (std::find(s.readers.begin(), s.readers.end(), current) != s.readers.end()) return;
    if (s.ready) s.ready->block(current);
    s.readers.push_back(current);
  }

  // What handle t of unit i holds while the unit is not staged.
  const at::Tensor& at_rest(std::size_t i, std::size_t t) const {
    return strict_ ? state_[i].wires[t] : units_[i].home_data[t].data;
  }

  // Strict mode off for good: handles point at their home copies, the tripwires are forgotten.
  void disarm() {
    if (!strict_) return;
    for (std::size_t i = 0; i < state_.size(); ++i) {
      auto& s = state_[i];
      if (!s.staged)
        for (std::size_t t = 0; t < s.wires.size(); ++t) units_[i].handles[t].set_data(units_[i].home_data[t].data);
      for (const auto& w : s.wires) detail::forget_tripwire(w);
      s.wires.clear();
    }
  }

  // The version counter of a handle; -1 for a tensor made under InferenceMode, which has none.
  static std::int64_t version_of(const at::Tensor& t) {
    auto* impl = t.unsafeGetTensorImpl();
    return impl->is_inference() ? -1 : static_cast<std::int64_t>(impl->version_counter().current_version());
  }

  // Copies the buffers of staged unit i that forward changed back into their home copies (see the
  // file comment). A failure is logged, not thrown: release runs where nothing may throw.
  void write_back_buffers(std::size_t i) noexcept {
    auto& u = units_[i];
    auto& s = state_[i];
    if (u.buffers.empty()) return;
    bool training = false;
    try {
      training = u.training && u.training();
    } catch (...) {
    }
    for (std::size_t t = 0; t < u.handles.size(); ++t) {
      if (!u.buffers[t] || t >= s.versions.size()) continue;
      const std::int64_t now = version_of(u.handles[t]);
      if (!training && now >= 0 && now == s.versions[t]) continue;
      at::Tensor& home = u.home_data[t].data;
      const at::Tensor& fetched = s.fetched[t].data;
      if (home.sizes() != fetched.sizes()) {  // kept quantized at home: there is no way back
        log(log_level::warning, "distorch: buffer " + std::to_string(t) + " of unit '" + u.name +
                                    "' changed on " + compute_.str() + " but its home keeps it quantized; the change is lost");
        continue;
      }
      try {
        home.copy_(fetched);  // dtype-converting where the home stores a narrower dtype
        ++stats_.buffers_written_back;
      } catch (const std::exception& e) {
        log(log_level::error, "distorch: could not write buffer " + std::to_string(t) + " of unit '" + u.name + "' back home: " + e.what());
      }
    }
  }

  void release(std::size_t i) {
    auto& u = units_[i];
    auto& s = state_[i];
    if (s.staged) write_back_buffers(i);
    if (s.staged)
      for (std::size_t t = 0; t < u.handles.size(); ++t) u.handles[t].set_data(at_rest(i, t));
    // Compute may still read the copies: the copy stream (whose pool the blocks return to) waits
    // for every stream that read them to pass this point before it may reuse them.
    if (!s.fetched.empty()) {
      if (s.readers.empty()) compute_passed_here();
      for (const auto& reader : s.readers) stream_passed_here(reader);
    }
    if (!s.fetched.empty()) drop(fetched_, i);
    if (s.ahead) drop(ahead_, i);
    if (s.lingering) drop(lingering_, i);
    s.fetched.clear();
    s.versions.clear();
    s.readers.clear();
    s.ready.reset();
    s.staged = false;
    s.ahead = false;
    s.lingering = false;
    s.by_caller = false;
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
  std::vector<std::size_t> order_;                                    // the learned sequence of streamed entries
  std::unordered_map<std::size_t, std::vector<std::size_t>> positions_;  // unit -> its positions in order_
  std::size_t cursor_ = 0;                                            // position of the last entry
  std::size_t last_entered_ = static_cast<std::size_t>(-1);          // any unit, resident ones too
  bool learning_ = true;
  std::vector<std::size_t> fetched_;    // units with copies on the compute device
  std::vector<std::size_t> ahead_;      // of those, fetched by prefetch and not yet entered
  std::vector<std::size_t> lingering_;  // staged, idle, kept for re-entry within the pass
  int passes_ = 0;
  bool strict_ = false;
  mutable std::vector<copy_timing> timings_;
  mutable streaming_stats stats_;
  std::function<void(residency_event)> trace_;
};

/// Enters units of a residency manager for one scope and leaves them, in reverse, when it ends
/// (also on exceptions). If entering one throws, the ones already entered are left before the
/// error propagates. What `DistributedModule::stage` and every streamed layer hold while they run.
/// \code
///   {
///     distorch::unit_scope staged(manager, std::vector<std::size_t>{3, 4});
///     run_units_3_and_4();
///   }   // left here
/// \endcode
class unit_scope {
 public:
  /// Nothing entered. \code distorch::unit_scope none; \endcode
  unit_scope() = default;
  /// Enters `units` (kept by reference: they must outlive the scope).
  /// \code distorch::unit_scope s(manager, units); \endcode
  unit_scope(residency_manager& manager, const std::vector<std::size_t>& units) : manager_(&manager), units_(&units) {
    enter_all();
  }
  /// Keeps `manager` alive for the scope and enters `units` (kept by reference); a null manager
  /// enters nothing. \code distorch::unit_scope s(weak.lock(), units); \endcode
  unit_scope(std::shared_ptr<residency_manager> manager, const std::vector<std::size_t>& units)
      : keep_(std::move(manager)), manager_(keep_.get()), units_(&units) {
    enter_all();
  }
  /// Keeps `manager` alive and owns the unit list. \code distorch::unit_scope s(shared, {0, 1}); \endcode
  unit_scope(std::shared_ptr<residency_manager> manager, std::vector<std::size_t>&& units)
      : keep_(std::move(manager)), manager_(keep_.get()), owned_(std::move(units)), units_(&owned_) {
    enter_all();
  }
  unit_scope(unit_scope&& other) noexcept
      : keep_(std::move(other.keep_)), manager_(std::exchange(other.manager_, nullptr)), owned_(std::move(other.owned_)),
        units_(other.units_ == &other.owned_ ? &owned_ : other.units_), entered_(std::exchange(other.entered_, 0)) {}
  unit_scope(const unit_scope&) = delete;
  unit_scope& operator=(const unit_scope&) = delete;
  unit_scope& operator=(unit_scope&&) = delete;
  ~unit_scope() { leave_all(); }

  /// The units this scope entered. \code for (auto u : scope.units()) manager.resident(u); \endcode
  const std::vector<std::size_t>& units() const noexcept {
    static const std::vector<std::size_t> none;
    return units_ ? *units_ : none;
  }

 private:
  void enter_all() {
    if (!manager_) return;
    try {
      for (; entered_ < units_->size(); ++entered_) manager_->enter((*units_)[entered_]);
    } catch (...) {
      leave_all();
      throw;
    }
  }
  void leave_all() noexcept {
    while (manager_ && entered_ > 0) manager_->leave((*units_)[--entered_]);
  }

  std::shared_ptr<residency_manager> keep_;
  residency_manager* manager_ = nullptr;
  std::vector<std::size_t> owned_;
  const std::vector<std::size_t>* units_ = nullptr;
  std::size_t entered_ = 0;
};

}  // namespace distorch::inline v0
