#pragma once
/// \file
/// Storage dtypes: floating weights of units homed off the compute device kept at home in a
/// narrower dtype than the module computes in (float8 e4m3fn / e5m2 from LibTorch 2.1, bfloat16,
/// float16), so fewer bytes rest there and cross the link. DistributedModule casts each tensor down
/// once, on the compute device after any adapter merge, and back to the module's dtype on the
/// compute device after every fetch (`residency_unit::after_fetch`).
///
/// Rounding when casting down:
/// - `rounding_mode::nearest_even` (default): exactly LibTorch's own `x.to(dtype)`, bit for bit,
///   with LibTorch's edge cases: values beyond float8_e4m3fn's range become NaN (it has no
///   infinity), beyond e5m2 / float16 / bfloat16's range infinity.
/// - `rounding_mode::stochastic` (as ComfyUI offers for fp8): each value becomes one of its two
///   neighbouring representable values, the farther one with probability distance / spacing, so
///   the result is unbiased in expectation. The noise comes from a generator of the compute device
///   seeded from `storage_options::seed` and the tensor's name, so a seed always gives the same
///   weights on a given device type (a CUDA and a CPU generator give different streams). Edges:
///   finite values beyond the largest finite value saturate to it (±448 for e4m3fn, ±57344 for
///   e5m2, ±65504 for float16); infinities and NaN are cast as LibTorch casts them (e4m3fn turns
///   ±inf into NaN); the float8 / float16 subnormals are ordinary neighbours (a value below the
///   smallest subnormal becomes 0 or that subnormal); exactly representable values are unchanged.
///   The work is done in float32 (float64 for float64 tensors) in blocks of `stochastic_block`
///   elements, so the scratch stays a few MiB whatever the tensor's size.
///
/// Example:
/// \code
///   distorch::distribute_spec spec{.compute = distorch::device_id::cuda(0)};
///   spec.storage.homes = {{distorch::device_id::cpu(), distorch::dtype::f8_e4m3}};
///   spec.storage.rounding = distorch::rounding_mode::stochastic;
///   spec.storage.seed = 42;
///   // or from the allocation string: policy_from_string("cuda:0,8gb;cpu,*:fp8")
///   at::Tensor w8 = distorch::round_stochastic(w, distorch::storage_scalar_type(distorch::dtype::f8_e4m3), 42);
/// \endcode

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/where.h>
#include <c10/core/ScalarType.h>

#include "distorch/core/error.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/model/dtype.hpp"
#include "distorch/model/torch_dtype.hpp"
#include "distorch/placement/grammar.hpp"

namespace distorch::inline v0 {

/// How floating values are rounded when they are cast down to a storage dtype.
/// \code spec.storage.rounding = distorch::rounding_mode::stochastic; \endcode
enum class rounding_mode : std::uint8_t {
  nearest_even,  ///< LibTorch's own `.to(dtype)`: round to nearest, ties to even
  stochastic,    ///< seeded stochastic rounding, unbiased in expectation (see the file comment)
};

/// Which homes store floating weights narrower, and how they are rounded there.
/// \code
///   distorch::storage_options s;
///   s.homes = distorch::storage_of(distorch::parse_allocation("cuda:0,8gb;cuda:1,4gb:bf16;cpu,*:fp8"));
///   s.of(distorch::device_id::cpu());   // dtype::f8_e4m3
/// \endcode
struct storage_options {
  /// Per home device: the dtype its floating tensors are stored in (the allocation string's
  /// `:dtype` suffixes, `storage_of`). Devices not listed store the module's dtypes.
  std::vector<device_storage> homes;
  rounding_mode rounding = rounding_mode::nearest_even;
  /// Seed of stochastic rounding; each tensor's noise comes from this and the tensor's name.
  std::uint64_t seed = 0;

  /// The storage dtype of a home, or nullopt when it stores the module's dtypes.
  /// \code if (auto d = spec.storage.of(distorch::device_id::cpu())) std::cout << distorch::dtype_name(*d); \endcode
  std::optional<dtype> of(const device_id& home) const {
    for (const auto& h : homes)
      if (h.device == home) return h.type;
    return std::nullopt;
  }
};

/// Elements per block of stochastic rounding: its float32 scratch is a few times 4 MiB.
/// \code static_assert(distorch::stochastic_block * 4 == 4 << 20); \endcode
inline constexpr std::int64_t stochastic_block = std::int64_t{1} << 20;

/// The LibTorch scalar type of a storage dtype. Throws `placement_error` for a dtype that is no
/// storage dtype (only float8_e4m3fn, float8_e5m2, bfloat16 and float16 are), and for float8 on a
/// LibTorch older than 2.1 (naming the version needed).
/// \code at::ScalarType t = distorch::storage_scalar_type(distorch::dtype::bf16);   // at::kBFloat16 \endcode
inline at::ScalarType storage_scalar_type(dtype t) {
  constexpr std::string_view doing = "choosing a storage dtype";
  switch (t) {
    case dtype::bf16: return at::kBFloat16;
    case dtype::f16: return at::kHalf;
    case dtype::f8_e4m3:
    case dtype::f8_e5m2:
#if defined(DISTORCH_TORCH_HAS_FLOAT8)
      return to_scalar_type(t);
#else
      throw placement_error({std::string(doing), std::string(dtype_name(t)), std::nullopt,
                             "float8 storage needs LibTorch 2.1 or newer; this LibTorch is " TORCH_VERSION,
                             "store in bf16 or fp16 (e.g. cpu,*:bf16), or build against LibTorch 2.1 or newer"});
#endif
    default: break;
  }
  throw placement_error({std::string(doing), std::string(dtype_name(t)), std::nullopt,
                         "not a storage dtype (storage dtypes are float8_e4m3fn, float8_e5m2, bfloat16 and float16)",
                         "choose one of fp8, e5m2, bf16, fp16"});
}

/// True when a tensor of `compute` type is stored as `storage`: it is floating point and
/// `storage` takes strictly fewer bytes per element. Integer and bool tensors, and floating ones
/// already as narrow, keep their dtype.
/// \code distorch::narrows_to(at::kFloat, at::kBFloat16);   // true; (at::kHalf, at::kBFloat16) is false \endcode
inline bool narrows_to(at::ScalarType compute, at::ScalarType storage) {
  return at::isFloatingType(compute) && c10::elementSize(storage) < c10::elementSize(compute);
}

/// The seed of one tensor's stochastic rounding: `seed` mixed with the tensor's name, so every
/// tensor has its own noise and gets the same whatever else is loaded, in whatever order.
/// \code auto s = distorch::storage_seed(42, "blocks.0.attn.qkv.weight"); \endcode
inline std::uint64_t storage_seed(std::uint64_t seed, std::string_view tensor_name) noexcept {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a of the name
  for (char c : tensor_name) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  std::uint64_t z = seed ^ h;  // splitmix64 finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

namespace detail {

inline double storage_max_finite(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return 65504.0;
    case at::kBFloat16: return 3.3895313892515355e38;  // (2 - 2^-7) * 2^127
#if defined(DISTORCH_TORCH_HAS_FLOAT8)
    case at::kFloat8_e4m3fn: return 448.0;
    case at::kFloat8_e5m2: return 57344.0;
#endif
    default: break;
  }
  throw placement_error({"rounding stochastically", c10::toString(t), std::nullopt,
                         "not a storage dtype", "round to float8_e4m3fn, float8_e5m2, bfloat16 or float16"});
}

// One block: `w` is float32 / float64, `u` uniform [0,1) of the same shape.
inline at::Tensor round_stochastic_block(const at::Tensor& w, const at::Tensor& u, at::ScalarType target, double limit) {
  const at::Tensor finite = at::isfinite(w);
  const at::Tensor saturated = at::where(finite, w.clamp(-limit, limit), w);
  const at::Tensor nearest = saturated.to(target);  // one neighbour: LibTorch's round to nearest even
  const at::ScalarType bits_type = c10::elementSize(target) == 1 ? at::kByte : at::kShort;
  const at::Tensor bits = nearest.view(bits_type);
  const at::Tensor back = nearest.to(w.scalar_type());
  // The other neighbour lies one step away in magnitude. These formats are sign-magnitude, so one
  // step is the bit pattern ± 1, across the subnormal / normal boundary as well. Saturation keeps
  // it finite: |saturated| <= the largest finite value, so a step up from below it stays finite.
  const at::Tensor up = back.abs() < saturated.abs();
  const at::Tensor other_bits = at::where(up, bits.add(1), bits.sub(1));
  const at::Tensor other = other_bits.view(target).to(w.scalar_type());
  // Both differences are exact (neighbours of a value, same sign); NaN (from NaN or inf input, or
  // the unused step below zero) compares false, so such values keep the nearest one.
  const at::Tensor p_other = (saturated - back).abs().div((other - back).abs());
  const at::Tensor take_other = u.lt(p_other).logical_and(finite);
  return at::where(take_other, other_bits, bits).view(target);
}

}  // namespace detail

/// Rounds `x` (floating) to `target` stochastically with `generator` (a generator of `x`'s device):
/// each value becomes one of its two neighbours in `target`, the farther one with probability
/// distance / spacing. See the file comment for the edges (saturation, NaN, inf, subnormals).
/// \code
///   at::Generator g = distorch::seeded_generator(w.device(), 42);
///   at::Tensor w8 = distorch::round_stochastic(w, at::kFloat8_e4m3fn, g);
/// \endcode
inline at::Tensor round_stochastic(const at::Tensor& x, at::ScalarType target, at::Generator generator) {
  const double limit = detail::storage_max_finite(target);
  if (!at::isFloatingType(x.scalar_type()))
    throw placement_error({"rounding stochastically", c10::toString(x.scalar_type()), std::nullopt,
                           "only floating tensors are rounded", "cast integer tensors with .to()"});
  const at::ScalarType work = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor flat = x.contiguous().view({-1});
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(target));
  at::Tensor out_flat = out.view({-1});
  const std::int64_t n = flat.numel();
  for (std::int64_t start = 0; start < n; start += stochastic_block) {
    const std::int64_t len = std::min(stochastic_block, n - start);
    const at::Tensor w = flat.narrow(0, start, len).to(work);
    at::Tensor u = at::empty({len}, w.options());
    u.uniform_(0.0, 1.0, generator);
    out_flat.narrow(0, start, len).copy_(detail::round_stochastic_block(w, u, target, limit));
  }
  return out;
}

/// A generator of `device`'s kind (CPU, CUDA, ...) seeded with `seed`, independent of the global one.
/// \code at::Generator g = distorch::seeded_generator(c10::Device(c10::kCUDA, 0), 42); \endcode
inline at::Generator seeded_generator(c10::Device device, std::uint64_t seed) {
  at::Generator base = at::globalContext().defaultGenerator(device);
  at::Generator own;
  {
    std::lock_guard<std::mutex> lock(base.mutex());
    own = base.clone();
  }
  own.set_current_seed(seed);
  return own;
}

/// `round_stochastic` with a generator of `x`'s device seeded with `seed`: the same seed gives
/// the same result on a given device type.
/// \code at::Tensor w8 = distorch::round_stochastic(w, at::kFloat8_e5m2, 42); \endcode
inline at::Tensor round_stochastic(const at::Tensor& x, at::ScalarType target, std::uint64_t seed) {
  return round_stochastic(x, target, seeded_generator(x.device(), seed));
}

/// Casts `x` to its storage dtype `target` with `rounding` (stochastic: seeded with
/// `storage_seed(seed, name)`). Round to nearest even is `x.to(target)`, bit for bit.
/// \code at::Tensor stored = distorch::cast_for_storage(w, at::kBFloat16, distorch::rounding_mode::nearest_even, 0, "fc.weight"); \endcode
inline at::Tensor cast_for_storage(const at::Tensor& x, at::ScalarType target, rounding_mode rounding, std::uint64_t seed,
                                   std::string_view name) {
  if (rounding == rounding_mode::stochastic) return round_stochastic(x, target, storage_seed(seed, name));
  return x.to(target);
}

}  // namespace distorch::inline v0
