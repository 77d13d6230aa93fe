#pragma once
/// \file
/// `distorch::nn::Streamed<Impl>`: any LibTorch module implementation, made to report to a
/// residency manager. C++ modules have no forward hooks, so the "before it runs" moment comes from
/// inheritance: `Streamed<Impl>::forward` stages the module's units, calls `Impl::forward`, and
/// releases them. Its `forward` has exactly `Impl::forward`'s signature (a partial specialization
/// on `decltype(&Impl::forward)`), so `AnyModule`, `Sequential` and `FORWARD_HAS_DEFAULT_ARGS`
/// keep working. Unattached, it is `Impl` plus one pointer check per call.
///
/// Default arguments are not part of a function type, so a direct call must spell every argument
/// out (`lstm->forward(x, {})`); `Sequential` and `AnyModule` fill defaults in as before.
///
/// Example:
/// \code
///   using MyLinear = torch::nn::ModuleHolder<distorch::nn::Streamed<torch::nn::LinearImpl>>;
///   MyLinear fc(64, 64);          // same constructors as torch::nn::Linear
///   auto y = fc(x);               // streams when a DistributedModule owns it
///   torch::nn::Sequential seq(fc, torch::nn::ReLU());
/// \endcode

#include <cstddef>
#include <memory>
#include <optional>
#include <ostream>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <c10/util/Optional.h>

#include "distorch/runtime/residency.hpp"

namespace distorch::inline v0 {
namespace nn {

/// The non-template side of every `Streamed<Impl>`: found with `dynamic_cast` when a distributed
/// module attaches its residency manager.
/// \code if (auto* s = dynamic_cast<distorch::nn::streamed_module*>(module.get())) s->residency_units(); \endcode
class streamed_module {
 public:
  virtual ~streamed_module() = default;

  /// Makes forward stage `units` of `manager` around each call.
  /// \code layer->attach_residency(manager, {3}); \endcode
  void attach_residency(std::weak_ptr<residency_manager> manager, std::vector<std::size_t> units) {
    manager_ = std::move(manager);
    units_ = std::move(units);
  }
  /// Stops staging units around forward. \code layer->detach_residency(); \endcode
  void detach_residency() noexcept {
    manager_.reset();
    units_.clear();
  }
  /// True while a live residency manager is attached. \code CHECK(layer->residency_attached()); \endcode
  bool residency_attached() const noexcept { return !manager_.expired(); }
  /// The units staged around each call. \code layer->residency_units(); \endcode
  const std::vector<std::size_t>& residency_units() const noexcept { return units_; }

 protected:
  /// Enters this layer's units for one call (nothing when unattached); they are left when the
  /// returned scope ends, also on exceptions.
  unit_scope enter_units() { return unit_scope(manager_.lock(), units_); }

 private:
  std::weak_ptr<residency_manager> manager_;
  std::vector<std::size_t> units_;
};

namespace detail {

/// A deep copy of a streamed `Impl` that is again a `Streamed<Impl>` (unattached): LibTorch's
/// `Cloneable<Impl>::clone` copies the `Impl` part only, which would make `Sequential::clone`,
/// `AnyModule` and every clone of a model drop the streaming.
/// Copies the `Module` part (parameters, buffers, submodules, name, training flag) of `from` into
/// `to`. LibTorch 1.x derives `Cloneable` from `Module` virtually, so a class deriving from an
/// `Impl` initialises `Module` itself (empty) and `Impl`'s copy constructor cannot fill it; in 2.x
/// this assigns what the copy already holds.
inline void copy_module_state(torch::nn::Module& to, const torch::nn::Module& from) { to = from; }

template <class S, class Impl>
std::shared_ptr<torch::nn::Module> clone_streamed(const S& self, const c10::optional<c10::Device>& device) {
  std::shared_ptr<torch::nn::Module> copy = self.Impl::clone(device);
  if constexpr (std::is_copy_constructible_v<Impl>) {
    if (auto* impl = dynamic_cast<Impl*>(copy.get())) return std::make_shared<S>(typename S::from_impl{}, *impl);
  }
  return copy;
}

}  // namespace detail

/// Primary template: selected only when `Impl::forward` is not a single member function, which
/// `Streamed` cannot wrap (the same rule `AnyModule` has).
template <class Impl, class Forward = decltype(&Impl::forward)>
class Streamed {
  static_assert(sizeof(Impl) == 0,
                "distorch::nn::Streamed<Impl>: Impl::forward must be one non-template, non-overloaded member function");
};

/// `Impl` whose forward stages its units first. See the file comment.
/// \code
///   torch::nn::ModuleHolder<distorch::nn::Streamed<torch::nn::Conv2dImpl>> conv(torch::nn::Conv2dOptions(3, 8, 3));
/// \endcode
template <class Impl, class Owner, class Result, class... Args>
class Streamed<Impl, Result (Owner::*)(Args...)> : public Impl, public streamed_module {
 public:
  using Impl::Impl;
  /// Tag of the constructor that wraps an existing `Impl`. \code Streamed s(Streamed::from_impl{}, impl); \endcode
  struct from_impl {};
  /// Wraps a copy of `impl` (shares its tensors); what `clone` uses.
  Streamed(from_impl, const Impl& impl) : Impl(impl) { detail::copy_module_state(*this, impl); }
  /// A deep copy that still streams once a distributed module owns it.
  /// \code auto copy = std::dynamic_pointer_cast<distorch::nn::Streamed<torch::nn::LinearImpl>>(fc->clone()); \endcode
  std::shared_ptr<torch::nn::Module> clone(const c10::optional<c10::Device>& device = c10::nullopt) const override {
    return detail::clone_streamed<Streamed, Impl>(*this, device);
  }
  /// Stages this layer's units (fetching them when streamed), runs `Impl::forward`, leaves them.
  Result forward(Args... args) {
    auto staged = enter_units();
    return Impl::forward(std::forward<Args>(args)...);
  }
};

/// Same for an `Impl::forward` declared `const`.
template <class Impl, class Owner, class Result, class... Args>
class Streamed<Impl, Result (Owner::*)(Args...) const> : public Impl, public streamed_module {
 public:
  using Impl::Impl;
  /// Tag of the constructor that wraps an existing `Impl`. \code Streamed s(Streamed::from_impl{}, impl); \endcode
  struct from_impl {};
  /// Wraps a copy of `impl` (shares its tensors); what `clone` uses.
  Streamed(from_impl, const Impl& impl) : Impl(impl) { detail::copy_module_state(*this, impl); }
  /// A deep copy that still streams once a distributed module owns it.
  /// \code auto copy = layer->clone(); \endcode
  std::shared_ptr<torch::nn::Module> clone(const c10::optional<c10::Device>& device = c10::nullopt) const override {
    return detail::clone_streamed<Streamed, Impl>(*this, device);
  }
  /// As the non-const `forward`: stages the units, runs `Impl::forward`, leaves them.
  Result forward(Args... args) const {
    auto staged = const_cast<Streamed*>(this)->enter_units();
    return Impl::forward(std::forward<Args>(args)...);
  }
};

/// `ModuleHolder` of a streamed implementation: what the one-line aliases in runtime/layers.hpp are.
/// \code using Linear = distorch::nn::streamed_holder<torch::nn::LinearImpl>; \endcode
template <class Impl>
using streamed_holder = torch::nn::ModuleHolder<Streamed<Impl>>;

}  // namespace nn
}  // namespace distorch::inline v0
