// LoRA merge throughput: rank 16 / 64 / 128 adapters merged into 4096×4096 float32 and bfloat16
// weights with distorch::merge_into, against this machine's memcpy bandwidth measured in the same
// program. Bytes counted are the weight's traffic, one read and one write of the stored weight (the
// minimum any merge must move), so "bytes_per_second" of a merge compared with memcpy's (which also
// reads and writes each byte once) is the fraction of the memory-bandwidth roofline reached.
// bench/lora_merge.py runs this program and the same merge written in Python PyTorch in one run and
// prints the ratios. Ratios matter, not absolute times: compare rows of one run.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/scalar_tensor.h>

#include <benchmark/benchmark.h>

#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "distorch/lora/merge.hpp"

namespace {

constexpr std::int64_t side = 4096;

void memcpy_bandwidth(benchmark::State& state) {
  const std::size_t bytes = static_cast<std::size_t>(side * side * 4);
  std::vector<char> from(bytes, 1), to(bytes, 2);
  for (auto _ : state) {
    std::memcpy(to.data(), from.data(), bytes);
    benchmark::DoNotOptimize(to.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(2 * bytes));
}

void lora_merge(benchmark::State& state) {
  const std::int64_t rank = state.range(0);
  const auto dtype = state.range(1) == 32 ? at::kFloat : at::kBFloat16;
  at::Tensor w = at::randn({side, side}, at::TensorOptions().dtype(at::kFloat)).mul_(0.02).to(dtype);
  std::map<std::string, at::Tensor> tensors{
      {"m.lora_up.weight", at::randn({side, rank}, at::TensorOptions().dtype(at::kFloat)).mul_(0.01)},
      {"m.lora_down.weight", at::randn({rank, side}, at::TensorOptions().dtype(at::kFloat)).mul_(0.01)},
      {"m.alpha", at::scalar_tensor(static_cast<double>(rank) / 2, at::TensorOptions().dtype(at::kFloat))}};
  const auto a = std::make_shared<distorch::adapter>(distorch::adapter::from_tensors("bench", tensors));
  // Strength 1 then -1 on alternate iterations keeps the weight from drifting.
  std::vector<distorch::merge_step> plus{{a.get(), &a->groups()[0], false, 1.0, 1.0}};
  std::vector<distorch::merge_step> minus{{a.get(), &a->groups()[0], false, -1.0, 1.0}};
  bool sign = true;
  for (auto _ : state) {
    distorch::merge_into(w, sign ? plus : minus, at::kCPU);
    sign = !sign;
    benchmark::DoNotOptimize(w.data_ptr());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * 2 * w.numel() * static_cast<std::int64_t>(w.element_size()));
  state.counters["threads"] = at::get_num_threads();
}

}  // namespace

BENCHMARK(memcpy_bandwidth)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(lora_merge)
    ->ArgNames({"rank", "bits"})
    ->ArgsProduct({{16, 64, 128}, {32, 16}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_MAIN();
