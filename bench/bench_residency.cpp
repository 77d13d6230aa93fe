// What one `enter` costs the host as a model grows. A forward here enters and leaves every one of
// N leaf units once, in order, inside a pass, after the first forward has taught the manager the
// order. Units hold one float each and are homed on `cpu`, computed on a simulated device, at
// prefetch depth 2: the time per entry is the manager's own bookkeeping plus one tiny copy.
// Entering is O(depth) (the cursor, the next `depth` entries, the few units fetched ahead), so the
// time per entry at 10k units should match the time at 100 units; a scan of every unit per entry
// would make it 100x. `resident` is the same loop with every unit on the compute device.
#include "distorch/device/device_id.hpp"
#include "distorch/runtime/device_pool.hpp"
#include "distorch/runtime/residency.hpp"

#include <ATen/ops/zeros.h>

#include <benchmark/benchmark.h>

#include <string>
#include <vector>

namespace {

distorch::device_pool bench_pool() {
  distorch::device_pool pool;
  pool.add(distorch::simulated_device(distorch::device_id::sim(0), 1ull << 40));
  pool.add_host();
  return pool;
}

std::vector<distorch::residency_unit> leaf_units(const distorch::device_pool& pool, std::size_t n, const distorch::device_id& home) {
  std::vector<distorch::residency_unit> units;
  units.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    distorch::residency_unit u;
    u.name = "leaf." + std::to_string(i);
    u.home = home;
    u.home_data.push_back(distorch::booked_copy_allocator{}.copy_to(at::zeros({1}), pool, pool.at(home), {false, false, "placing a leaf"}));
    u.handles.push_back(u.home_data.back().data.detach());
    u.bytes = sizeof(float);
    units.push_back(std::move(u));
  }
  return units;
}

void forward_over(distorch::residency_manager& manager) {
  auto pass = manager.pass();
  for (std::size_t i = 0; i < manager.size(); ++i) {
    manager.enter(i);
    manager.leave(i);
  }
}

void run(benchmark::State& state, const distorch::device_id& home) {
  const auto n = static_cast<std::size_t>(state.range(0));
  auto pool = bench_pool();
  distorch::residency_manager manager(pool, distorch::device_id::sim(0), leaf_units(pool, n, home), {.prefetch_depth = 2});
  forward_over(manager);  // learns the order
  manager.reset_stats();
  for (auto _ : state) forward_over(manager);
  const auto entries = static_cast<double>(state.iterations()) * static_cast<double>(n);
  state.counters["entries/s"] = benchmark::Counter(entries, benchmark::Counter::kIsRate);
  state.counters["ns/entry"] = benchmark::Counter(entries * 1e-9, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  if (home != distorch::device_id::sim(0) && manager.stats().prefetch_misses != 0) state.SkipWithError("a learned forward missed");
}

void bm_forward_streamed(benchmark::State& state) { run(state, distorch::device_id::cpu()); }
void bm_forward_resident(benchmark::State& state) { run(state, distorch::device_id::sim(0)); }

}  // namespace

BENCHMARK(bm_forward_streamed)->Arg(100)->Arg(1000)->Arg(10000)->Unit(benchmark::kMillisecond);
BENCHMARK(bm_forward_resident)->Arg(100)->Arg(1000)->Arg(10000)->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
