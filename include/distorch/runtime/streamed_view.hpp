#pragma once
/// \file
/// `distorch::views::streamed(dm)`: a pipeable range adaptor for custom forward loops. Over a range
/// of modules (a `ModuleList`, a vector of blocks, ...) it yields each module with its units
/// resident on the compute device, and prefetches the units of the next `prefetch_depth` modules
/// before the loop body runs, so their copies overlap the body's compute. The previous module's
/// units are released when the loop moves on (or when the view ends, also on `break`).
///
/// It is single-pass (an input range): residency follows the loop, not the iterators.
///
/// Example:
/// \code
///   at::Tensor x = embed(tokens);
///   for (auto& block : *blocks | distorch::views::streamed(dm))
///     x = block->as<Block>()->forward(x);
/// \endcode

#include <concepts>
#include <cstddef>
#include <iterator>
#include <memory>
#include <ranges>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/nn/module.h>

#include "distorch/runtime/residency.hpp"

namespace distorch::inline v0 {

namespace detail {

/// The module an element of a module range refers to: a shared_ptr, a ModuleHolder, or a Module.
template <class E>
torch::nn::Module& module_of_element(E& e) {
  using T = std::remove_cvref_t<E>;
  if constexpr (std::is_base_of_v<torch::nn::Module, T>) return e;
  else if constexpr (requires { e.ptr(); }) return *e.ptr();
  else return *e;
}

template <class E>
concept module_element = requires(E& e) { { module_of_element(e) } -> std::same_as<torch::nn::Module&>; };

/// What `views::streamed` needs from a distributed module.
template <class DM>
concept streaming_owner = requires(DM& dm, const torch::nn::Module& m) {
  { dm.units_of(m) } -> std::same_as<std::vector<std::size_t>>;
  { dm.residency() } -> std::same_as<residency_manager&>;
};

template <class T>
inline constexpr bool always_false_v = false;

}  // namespace detail

namespace views {

/// The view `range | views::streamed(dm)` makes. Holds the range (or a reference to it).
/// \code
///   auto view = *blocks | distorch::views::streamed(dm);   // a streamed_view
///   for (auto& block : view) x = block->as<Block>()->forward(x);
/// \endcode
template <std::ranges::input_range R, class DM>
class streamed_view {
 public:
  /// Usually made by the pipe: `range | views::streamed(dm)`.
  /// \code distorch::views::streamed_view<decltype(v), decltype(dm)> view(v, dm); \endcode
  streamed_view(R base, DM& dm) : base_(std::move(base)), dm_(&dm) {}
  streamed_view(const streamed_view&) = delete;
  streamed_view& operator=(const streamed_view&) = delete;
  streamed_view(streamed_view&& other) noexcept
      : base_(std::move(other.base_)), dm_(other.dm_), entered_(std::move(other.entered_)) {
    other.entered_.clear();
  }
  ~streamed_view() { leave_current(); }

  /// The end of the underlying range.
  class sentinel {
   public:
    std::ranges::sentinel_t<R> end_;
  };

  /// Single-pass iterator: advancing it releases the module left and stages the next one.
  class iterator {
   public:
    using value_type = std::ranges::range_value_t<R>;
    using difference_type = std::ptrdiff_t;
    using iterator_concept = std::input_iterator_tag;

    iterator() = default;
    decltype(auto) operator*() const { return *it_; }
    iterator& operator++() {
      ++it_;
      parent_->arrive(it_);
      return *this;
    }
    void operator++(int) { ++*this; }
    friend bool operator==(const iterator& i, const sentinel& s) { return i.it_ == s.end_; }

   private:
    friend class streamed_view;
    iterator(streamed_view* parent, std::ranges::iterator_t<R> it) : parent_(parent), it_(std::move(it)) {}
    streamed_view* parent_ = nullptr;
    std::ranges::iterator_t<R> it_;
  };

  /// Stages the first module (and prefetches the ones after it). Call once.
  /// \code auto it = view.begin(); \endcode
  iterator begin() {
    auto it = std::ranges::begin(base_);
    arrive(it);
    return iterator(this, std::move(it));
  }
  /// \code for (auto it = view.begin(); it != view.end(); ++it) run(*it); \endcode
  sentinel end() {
    sentinel s;
    s.end_ = std::ranges::end(base_);
    return s;
  }

 private:
  // Releases the module just finished, stages the one arrived at, prefetches the next ones.
  void arrive(const std::ranges::iterator_t<R>& it) {
    leave_current();
    if (it == std::ranges::end(base_)) return;
    auto& manager = dm_->residency();
    auto units = dm_->units_of(detail::module_of_element(*it));
    for (auto u : units) {
      manager.enter(u);
      entered_.push_back(u);
    }
    if constexpr (std::ranges::forward_range<R>) {
      auto next = it;
      for (std::size_t k = 0; k < manager.options().prefetch_depth; ++k) {
        if (++next == std::ranges::end(base_)) break;
        for (auto u : dm_->units_of(detail::module_of_element(*next))) manager.prefetch(u);
      }
    }
  }

  void leave_current() noexcept {
    if (entered_.empty()) return;
    auto& manager = dm_->residency();
    while (!entered_.empty()) {
      manager.leave(entered_.back());
      entered_.pop_back();
    }
  }

  R base_;
  DM* dm_;
  std::vector<std::size_t> entered_;
};

/// The pipe closure `views::streamed(dm)` returns.
/// \code
///   auto stream_blocks = distorch::views::streamed(dm);
///   for (auto& block : *blocks | stream_blocks) x = block->as<Block>()->forward(x);
/// \endcode
template <class DM>
struct streamed_closure {
  DM* dm;

  /// `range | views::streamed(dm)`. A ModuleHolder of a container (`ModuleList`) may be piped as is.
  template <class R>
  friend auto operator|(R&& range, streamed_closure c) {
    if constexpr (requires { range.ptr(); (*range.ptr()).begin(); }) {
      using container = std::remove_reference_t<decltype(*range.ptr())>;
      return streamed_view<std::ranges::ref_view<container>, DM>(std::ranges::ref_view<container>(*range.ptr()), *c.dm);
    } else if constexpr (std::ranges::input_range<R> && detail::module_element<std::ranges::range_reference_t<R>>) {
      return streamed_view<std::views::all_t<R>, DM>(std::views::all(std::forward<R>(range)), *c.dm);
    } else {
      static_assert(detail::always_false_v<R>,
                    "range | distorch::views::streamed(dm): the left side must be a range of modules "
                    "(a ModuleList, or a range of std::shared_ptr<Module> / ModuleHolder / Module&)");
    }
  }
};

/// The adaptor object's type.
struct streamed_fn {
  /// \code for (auto& b : *blocks | distorch::views::streamed(dm)) x = b->as<Block>()->forward(x); \endcode
  template <class DM>
  constexpr auto operator()(DM& dm) const {
    static_assert(detail::streaming_owner<DM>,
                  "distorch::views::streamed(dm): dm must be a distorch::DistributedModule (something with "
                  "units_of(module) and residency())");
    return streamed_closure<DM>{&dm};
  }
};

/// `range | distorch::views::streamed(dm)`: see the file comment.
/// \code
///   std::vector<std::shared_ptr<torch::nn::Module>> stages = {enc, mid, dec};
///   for (auto& stage : stages | distorch::views::streamed(dm)) x = run(*stage, x);
/// \endcode
inline constexpr streamed_fn streamed{};

}  // namespace views
}  // namespace distorch::inline v0
