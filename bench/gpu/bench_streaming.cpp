// Streaming benchmark: a stack of equal transformer blocks, half of them homed on (pinned) host
// memory, run through DistributedModule. Cases, measured in one run:
// - all resident (the compute time of a step);
// - distorch with prefetch depth 1 and 2;
// - synchronous fetch per unit (prefetch depth 0: DisTorch2's behaviour).
// Each streaming case reports `ratio` = step time / max(compute, offloaded bytes / H2D bandwidth),
// with the bandwidth measured here by copying one block's bytes from pinned memory. Target: <= 1.1.
//
// On a GPU machine (CUDA found) the default is 12 blocks of width 4096 in bf16 (~4.7 GiB) and 2048
// tokens. Without a GPU it runs a tiny float32 configuration on a simulated compute device, which
// exercises the same paths. Override with DISTORCH_BENCH_WIDTH, _BLOCKS, _TOKENS.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/randn.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/nn/modules/container/sequential.h>

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>

#include "distorch/device/discover.hpp"
#include "distorch/runtime/demo.hpp"
#include "distorch/runtime/distributed_module.hpp"

namespace {

using namespace distorch;

struct bench_config {
  std::int64_t width, blocks, tokens;
  bool gpu;
  at::ScalarType dtype;
};

std::int64_t env_or(const char* name, std::int64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : fallback;
}

const bench_config& config() {
  static const bench_config c = [] {
    const bool gpu = torch_device_count(c10::DeviceType::CUDA) > 0;
    return bench_config{env_or("DISTORCH_BENCH_WIDTH", gpu ? 4096 : 128), env_or("DISTORCH_BENCH_BLOCKS", gpu ? 12 : 6),
                        env_or("DISTORCH_BENCH_TOKENS", gpu ? 2048 : 16), gpu, gpu ? at::kBFloat16 : at::kFloat};
  }();
  return c;
}

device_pool make_pool() {
  device_pool pool;
  if (config().gpu) {
    for (const auto& d : discover().devices) pool.add(real_device(d));
  } else {
    pool.add(simulated_device(device_id::sim(0), 1ull << 40, "simulated GPU")).add_host();
  }
  return pool;
}

device_id compute_id() { return config().gpu ? device_id::cuda(0) : device_id::sim(0); }

void synchronize(const c10::Device& d) {
  if (d.type() == c10::DeviceType::CPU) return;
  c10::impl::VirtualGuardImpl impl(d.type());
  impl.synchronizeStream(impl.getStream(d));
}

// One distributed stack of blocks; `offload` puts every other block on the CPU.
struct stack {
  std::unique_ptr<DistributedModule<torch::nn::Sequential>> dm;
  at::Tensor input;
  std::uint64_t offloaded_bytes = 0;
  c10::Device device{c10::DeviceType::CPU};

  stack(bool offload, std::size_t depth) {
    const auto& c = config();
    at::manual_seed(0);
    torch::nn::Sequential seq;
    for (std::int64_t i = 0; i < c.blocks; ++i) seq->push_back(demo::attention_block(c.width, 4 * c.width));
    seq->to(c.dtype);
    distribute_spec spec;
    spec.compute = compute_id();
    spec.grouping = {{R"(\d+)"}};
    spec.streaming.prefetch_depth = depth;
    spec.streaming.pinned_host = true;
    auto pool = make_pool();
    const auto inv = bind_units(*seq, spec.grouping).units;
    placement_plan plan;
    plan.compute = spec.compute;
    plan.policy = offload ? "every other block on cpu" : "all resident";
    for (std::size_t i = 0; i < inv.size(); ++i) {
      const bool away = offload && i % 2 == 1;
      plan.units.push_back({inv[i].name, away ? device_id::cpu() : spec.compute, inv[i].bytes, placement_reason::policy});
      if (away) offloaded_bytes += inv[i].bytes;
    }
    dm = std::make_unique<DistributedModule<torch::nn::Sequential>>(seq, pool, plan, spec);
    device = pool.at(spec.compute).torch_device;
    input = at::randn({1, c.tokens, c.width}).to(device, c.dtype);
  }

  double step() {
    const auto start = std::chrono::steady_clock::now();
    at::Tensor y = dm->forward(input);
    synchronize(device);
    benchmark::DoNotOptimize(y.data_ptr());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
};

// Host-to-device bandwidth for one block's bytes from pinned memory (or a host copy without a GPU).
double measured_bandwidth(std::uint64_t bytes) {
  const bool gpu = config().gpu;
  at::Tensor host = at::empty({static_cast<std::int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(gpu));
  host.fill_(1);
  const c10::Device device = gpu ? c10::Device(c10::DeviceType::CUDA, 0) : c10::Device(c10::DeviceType::CPU);
  at::Tensor target = at::empty_like(host, at::TensorOptions().device(device).pinned_memory(false));
  target.copy_(host);
  synchronize(device);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 5; ++i) target.copy_(host, /*non_blocking=*/true);
  synchronize(device);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return 5.0 * static_cast<double>(bytes) / seconds;
}

// The compute time of a step and the link bandwidth, measured once for every case of this run.
struct baseline {
  double compute_seconds = 0;
  double bandwidth = 0;
};

const baseline& reference() {
  static const baseline b = [] {
    stack all(false, 0);
    all.step();  // warm up
    double best = 1e30;
    for (int i = 0; i < 3; ++i) best = std::min(best, all.step());
    const auto& inv = all.dm->units();
    return baseline{best, measured_bandwidth(inv.units().front().bytes)};
  }();
  return b;
}

void report(benchmark::State& state, const stack& s, double seconds_total, std::int64_t steps) {
  const auto& base = reference();
  const double step = seconds_total / static_cast<double>(steps);
  const double transfer = static_cast<double>(s.offloaded_bytes) / base.bandwidth;
  const double bound = std::max(base.compute_seconds, transfer);
  state.counters["step_ms"] = step * 1e3;
  state.counters["compute_ms"] = base.compute_seconds * 1e3;
  state.counters["h2d_GBps"] = base.bandwidth / 1e9;
  state.counters["offloaded_MiB"] = static_cast<double>(s.offloaded_bytes) / (1 << 20);
  state.counters["ratio"] = step / bound;
  const auto stats = s.dm->stats();
  state.counters["hit_rate"] = stats.hit_rate();
  state.counters["late"] = static_cast<double>(stats.late_prefetches);
}

void run_case(benchmark::State& state, bool offload, std::size_t depth) {
  reference();
  stack s(offload, depth);
  s.step();  // the first forward learns the execution order
  s.dm->reset_stats();
  double total = 0;
  std::int64_t steps = 0;
  for (auto _ : state) {
    const double t = s.step();
    state.SetIterationTime(t);
    total += t;
    ++steps;
  }
  report(state, s, total, steps);
}

void BM_all_resident(benchmark::State& state) { run_case(state, false, 0); }
void BM_prefetch_depth_1(benchmark::State& state) { run_case(state, true, 1); }
void BM_prefetch_depth_2(benchmark::State& state) { run_case(state, true, 2); }
void BM_synchronous_fetch(benchmark::State& state) { run_case(state, true, 0); }

}  // namespace

BENCHMARK(BM_all_resident)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
BENCHMARK(BM_prefetch_depth_1)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
BENCHMARK(BM_prefetch_depth_2)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
BENCHMARK(BM_synchronous_fetch)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

int main(int argc, char** argv) {
  at::set_num_threads(config().gpu ? at::get_num_threads() : 1);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
