// What accounting costs: LibTorch's CPU allocator alone vs the same allocation through
// accounting_allocator (budget reservation + the deleter that releases it), and the byte budget's
// reserve/release under contention from several threads (the compute thread and copy threads).
#include "distorch/device/byte_budget.hpp"
#include "distorch/device/device.hpp"
#include "distorch/memory/accounting_allocator.hpp"
#include "distorch/memory/allocator.hpp"

#include <benchmark/benchmark.h>

namespace {

void bm_device_allocator(benchmark::State& state) {
  distorch::device_allocator alloc(distorch::device_id::cpu());
  const std::int64_t n = state.range(0);
  for (auto _ : state) {
    at::Tensor t = alloc.allocate({n}, at::kByte);
    benchmark::DoNotOptimize(t.data_ptr());
  }
  state.SetItemsProcessed(state.iterations());
}

void bm_accounting_allocator(benchmark::State& state) {
  distorch::accounting_allocator alloc(distorch::device_allocator(distorch::device_id::cpu()), 1ull << 40);
  const std::int64_t n = state.range(0);
  for (auto _ : state) {
    at::Tensor t = alloc.allocate({n}, at::kByte);
    benchmark::DoNotOptimize(t.data_ptr());
  }
  if (alloc.used() != 0) state.SkipWithError("accounting leaked");
  state.SetItemsProcessed(state.iterations());
}

distorch::simulated_device& shared_device() {
  static distorch::simulated_device device(distorch::device_id::sim(0), 1ull << 40);
  return device;
}

void bm_budget_reserve_release(benchmark::State& state) {
  distorch::simulated_device device = shared_device();  // each thread its own handle, one account
  for (auto _ : state) {
    device.reserve(4096);
    device.release(4096);
  }
  state.SetItemsProcessed(state.iterations());
}

}  // namespace

BENCHMARK(bm_device_allocator)->Arg(4 << 10)->Arg(1 << 20);
BENCHMARK(bm_accounting_allocator)->Arg(4 << 10)->Arg(1 << 20);
BENCHMARK(bm_budget_reserve_release)->Threads(1)->Threads(2)->Threads(4);
BENCHMARK_MAIN();
