#pragma once
// Test models in three shapes (MLP stack, transformer with attention, conv net), built from
// distorch::nn layers, plus helpers shared by the runtime test files.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/randn.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/pooling.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "distorch/runtime/demo.hpp"
#include "distorch/runtime/device_pool.hpp"
#include "distorch/runtime/layers.hpp"

namespace test_models {

inline void deterministic() {
  at::set_num_threads(1);
  at::manual_seed(1234);
}

/// Linear → ReLU, `depth` times.
inline torch::nn::Sequential mlp_stack(std::int64_t width = 32, int depth = 6) {
  torch::nn::Sequential seq;
  for (int i = 0; i < depth; ++i) {
    seq->push_back(distorch::nn::Linear(width, width));
    seq->push_back(torch::nn::ReLU());
  }
  return seq;
}

/// Conv2d → BatchNorm2d → ReLU → Conv2d → GroupNorm → ReLU → Conv2d → AdaptiveAvgPool2d → Flatten →
/// Linear, in eval mode; the units are of similar size, so every policy form spreads them.
inline torch::nn::Sequential conv_net() {
  torch::nn::Sequential seq(
      distorch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1)), distorch::nn::BatchNorm2d(8), torch::nn::ReLU(),
      distorch::nn::Conv2d(torch::nn::Conv2dOptions(8, 12, 3).padding(1)), distorch::nn::GroupNorm(torch::nn::GroupNormOptions(4, 12)),
      torch::nn::ReLU(), distorch::nn::Conv2d(torch::nn::Conv2dOptions(12, 12, 3)), torch::nn::AdaptiveAvgPool2d(1),
      torch::nn::Flatten(), distorch::nn::Linear(12, 10));
  seq->eval();
  return seq;
}

inline distorch::demo::tiny_transformer transformer() { return distorch::demo::tiny_transformer(16, 32, 3); }

/// A model made twice with the same seed: one to distribute, one as the reference.
template <class Make>
auto twin(Make make) {
  deterministic();
  auto a = make();
  deterministic();
  auto b = make();
  return std::make_pair(a, b);
}

// Gives `to` copies of `from`'s parameters (same names), so two instances compute the same thing.
inline void copy_weights(torch::nn::Module& from, torch::nn::Module& to) {
  auto source = from.named_parameters(true);
  for (const auto& p : to.named_parameters(true)) {
    at::Tensor h = p.value();
    h.set_data(source[p.key()].detach().clone());
  }
}

/// A checksum of every byte of every parameter and buffer, with names.
inline std::uint64_t checksum(torch::nn::Module& m) {
  std::uint64_t h = 1469598103934665603ull;
  auto mix = [&](const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  for (const auto& t : m.named_parameters(true)) {
    mix(t.key().data(), t.key().size());
    auto c = t.value().contiguous();
    mix(c.data_ptr(), c.numel() * c.element_size());
  }
  for (const auto& t : m.named_buffers(true)) {
    mix(t.key().data(), t.key().size());
    auto c = t.value().contiguous();
    mix(c.data_ptr(), c.numel() * c.element_size());
  }
  return h;
}

/// True when the two tensors hold the same bits.
inline bool bit_identical(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  auto x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(), x.numel() * x.element_size()) == 0;
}

/// Bytes the copies of streamed units fetched ahead (for the next forward: the learned order is
/// cyclic) hold on the compute device now.
template <class Manager>
std::uint64_t fetched_ahead(const Manager& manager) {
  std::uint64_t total = 0;
  for (std::size_t u = 0; u < manager.size(); ++u)
    if (manager.streams(u) && !manager.resident(u)) total += manager.held_bytes(u);
  return total;
}

/// sim:0 (compute) with `compute_capacity`, sim:1 (a donor "GPU") with `donor_capacity`, and cpu.
inline distorch::device_pool sim_pool(std::uint64_t compute_capacity, std::uint64_t donor_capacity = 64ull << 20) {
  distorch::device_pool pool;
  pool.add(distorch::simulated_device(distorch::device_id::sim(0), compute_capacity));
  pool.add(distorch::simulated_device(distorch::device_id::sim(1), donor_capacity));
  pool.add_host();
  return pool;
}

}  // namespace test_models
