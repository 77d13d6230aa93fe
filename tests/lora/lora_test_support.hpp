#pragma once
// Helpers shared by the LibTorch LoRA tests: seeded random tensors, float64 comparisons, adapters
// from tensors. Temporary folders and python3-torch come from support/test_files.hpp.
#include <ATen/core/Tensor.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/TensorOperators.h>


#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "distorch/lora/adapter.hpp"
#include "support/test_files.hpp"

namespace lora_test {

inline at::Tensor randn(std::vector<std::int64_t> shape, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
}

/// Largest absolute difference between a result and a float64 reference, relative to the
/// reference's largest magnitude (at least 1).
inline double relative_error(const at::Tensor& result, const at::Tensor& reference64) {
  const auto r = result.to(at::kDouble);
  const double scale = std::max(1.0, reference64.abs().max().item<double>());
  return (r - reference64).abs().max().item<double>() / scale;
}

/// float32 math against float64 math: a few float32 epsilons of the largest value.
inline constexpr double f32_tolerance = 1e-5;

inline bool bit_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const auto ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), static_cast<std::size_t>(ac.numel()) * ac.element_size()) == 0;
}

inline std::shared_ptr<distorch::adapter> make_adapter(std::map<std::string, at::Tensor> tensors, std::string name = "test") {
  return std::make_shared<distorch::adapter>(distorch::adapter::from_tensors(std::move(name), std::move(tensors)));
}

inline at::Tensor scalar(double v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kFloat)); }

}  // namespace lora_test
