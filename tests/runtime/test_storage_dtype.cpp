// Storage dtypes (runtime/storage_dtype.hpp and DistributedModule): units homed off the compute
// device stored in bfloat16 / float16 (and float8 from LibTorch 2.1), cast back after each fetch.
// What crosses the link and rests at home is the stored bytes; the fetched weights are LibTorch's
// own w.to(dtype).to(float32); an adapter is merged in float32 before the one cast; stochastic
// rounding is seeded, unbiased and always picks a neighbour; forward matches the undistributed
// model whose weights were cast the same way, bit for bit.
#include "models.hpp"

#include <ATen/ops/arange.h>
#include <ATen/ops/exp2.h>
#include <ATen/ops/full.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "distorch/lora/adapter.hpp"
#include "distorch/lora/patcher.hpp"
#include "distorch/runtime/distributed_module.hpp"
#include "distorch/runtime/storage_dtype.hpp"

#include <doctest/doctest.h>

namespace {

using distorch::device_id;
using distorch::dtype;

struct storage_case {
  const char* suffix;
  dtype type;
  at::ScalarType scalar;
};

// Every storage dtype this LibTorch has.
std::vector<storage_case> storage_cases() {
  std::vector<storage_case> out{{"bf16", dtype::bf16, at::kBFloat16}, {"fp16", dtype::f16, at::kHalf}};
#if defined(DISTORCH_TORCH_HAS_FLOAT8)
  out.push_back({"fp8", dtype::f8_e4m3, at::kFloat8_e4m3fn});
  out.push_back({"e5m2", dtype::f8_e5m2, at::kFloat8_e5m2});
#endif
  return out;
}

// The narrowest storage dtype this LibTorch has.
storage_case narrowest() { return storage_cases().back(); }

constexpr std::int64_t width = 64;
constexpr int depth = 4;

using test_models::twin;

auto mlp() { return test_models::mlp_stack(width, depth); }

std::map<std::string, at::Tensor> tensors_of(torch::nn::Module& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : m.named_parameters(true)) out.emplace(p.key(), p.value());
  for (const auto& b : m.named_buffers(true)) out.emplace(b.key(), b.value());
  return out;
}

// Copies of the model's tensors, untouched by later set_data on the model.
std::map<std::string, at::Tensor> snapshot(torch::nn::Module& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : tensors_of(m)) out.emplace(name, t.detach().clone());
  return out;
}

// Casts, in `m`, the floating tensors of every unit the plan homes on `home` the way storage does:
// `cast(tensor, name)` gives the stored tensor, which is then cast back.
template <class Cast>
void cast_homed_on(torch::nn::Module& m, const distorch::placement_plan& plan, const device_id& home, Cast cast) {
  for (auto& [name, t] : tensors_of(m)) {
    bool stored = false;
    for (const auto& u : plan.units)
      if (u.device == home && name.rfind(u.unit + ".", 0) == 0) stored = true;
    if (!stored || !t.is_floating_point()) continue;
    at::Tensor h = t;
    h.set_data(cast(t.detach(), name).to(t.scalar_type()));
  }
}

std::shared_ptr<const distorch::adapter> lora_on(const std::vector<std::string>& modules, std::int64_t rank = 4) {
  at::manual_seed(99);
  std::map<std::string, at::Tensor> tensors;
  for (const auto& m : modules) {
    tensors.emplace(m + ".lora_up.weight", at::randn({width, rank}).mul(0.1));
    tensors.emplace(m + ".lora_down.weight", at::randn({rank, width}).mul(0.1));
    tensors.emplace(m + ".alpha", at::full({}, 2.0, at::kFloat));
  }
  return std::make_shared<const distorch::adapter>(distorch::adapter::from_tensors("lora", std::move(tensors)));
}

// All finite values of a storage dtype, ascending, as float64.
std::vector<double> finite_values(at::ScalarType t) {
  const at::Tensor bits = c10::elementSize(t) == 1 ? at::arange(0, 256, at::kInt).to(at::kByte)
                                                    : at::arange(-32768, 32768, at::kInt).to(at::kShort);
  const at::Tensor values = bits.view(t).to(at::kDouble).contiguous();
  std::vector<double> out;
  const double* v = values.data_ptr<double>();
  for (std::int64_t i = 0; i < values.numel(); ++i)
    if (std::isfinite(v[i])) out.push_back(v[i] == 0 ? 0.0 : v[i]);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// The neighbours of x among `grid` (equal when x is on it); x is within the grid's range.
std::pair<double, double> neighbours(const std::vector<double>& grid, double x) {
  const auto hi = std::lower_bound(grid.begin(), grid.end(), x);
  if (*hi == x) return {x, x};
  return {*(hi - 1), *hi};
}

std::vector<double> as_doubles(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return {d.data_ptr<double>(), d.data_ptr<double>() + d.numel()};
}

}  // namespace

TEST_CASE("storage dtype: homes hold and the link carries the stored bytes; fetched weights are LibTorch's w.to(dtype).to(float32); forward matches bit for bit") {
  for (const auto& c : storage_cases()) {
    const std::string suffix = c.suffix;
    CAPTURE(suffix);
    auto [model, reference] = twin(mlp);
    const auto originals = snapshot(*reference);
    const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
    const std::uint64_t unit_bytes = model_bytes / depth;
    const std::uint64_t stored_unit = unit_bytes / 4 * c10::elementSize(c.scalar);
    auto pool = test_models::sim_pool(2 * model_bytes);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.streaming.prefetch_depth = 1;
    // The head unit stays on the compute device, the other three live on the CPU, stored narrower.
    distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0," + std::to_string(unit_bytes) + "b;cpu,*:" + suffix), spec);
    CHECK((dm.spec().storage.of(device_id::cpu()) == c.type));
    REQUIRE(dm.plan().units.size() == depth);
    CHECK(dm.plan().units[0].device == device_id::sim(0));
    CHECK(dm.plan().units[0].bytes == unit_bytes);
    for (std::size_t i = 1; i < depth; ++i) {
      CHECK(dm.plan().units[i].device == device_id::cpu());
      CHECK(dm.plan().units[i].bytes == stored_unit);  // the plan books the stored bytes at home
    }
    CHECK(pool.used(device_id::cpu()) == 3 * stored_unit);

    // At home each streamed tensor is LibTorch's own cast of the original.
    for (const auto& [name, t] : tensors_of(*model)) {
      CAPTURE(name);
      if (name.rfind("0.", 0) == 0) {
        CHECK(test_models::bit_identical(t, originals.at(name)));
      } else {
        CHECK((t.scalar_type() == c.scalar));
        CHECK(test_models::bit_identical(t, originals.at(name).to(c.scalar)));
      }
    }
    cast_homed_on(*reference, dm.plan(), device_id::cpu(), [&](const at::Tensor& t, const std::string&) { return t.to(c.scalar); });
    const at::Tensor x = (test_models::deterministic(), at::randn({3, width}));
    const at::Tensor expected = reference->forward(x);
    CHECK(test_models::bit_identical(dm.forward(x), expected));
    dm.reset_stats();
    CHECK(test_models::bit_identical(dm.forward(x), expected));
    const auto s = dm.stats();
    CHECK(s.fetches == 3);
    CHECK(s.bytes_fetched == 3 * stored_unit);  // bytes over the link: the stored ones
    // The window counts a unit at its float32 size once staged, so prefetching keeps up.
    CHECK(s.prefetch_hits == 3);
    CHECK(s.prefetch_misses == 0);
    CHECK(pool.used(device_id::sim(0)) == unit_bytes + test_models::fetched_ahead(dm.residency()));
    CHECK(pool.peak(device_id::sim(0)) <= pool.capacity(device_id::sim(0)));

    // Fetched and staged: float32 again, exactly w.to(dtype).to(float32).
    dm.residency().set_prefetch_depth(0);
    dm.residency().enter(1);
    CHECK((tensors_of(*model).at("2.weight").scalar_type() == at::kFloat));
    CHECK(test_models::bit_identical(tensors_of(*model).at("2.weight"), originals.at("2.weight").to(c.scalar).to(at::kFloat)));
    CHECK(pool.used(device_id::sim(0)) == 2 * unit_bytes);  // the compute device holds float32 while it runs
    dm.residency().leave(1);
    CHECK((tensors_of(*model).at("2.weight").scalar_type() == c.scalar));
    CHECK(pool.used(device_id::sim(0)) == unit_bytes);
  }
}

TEST_CASE("storage dtype: an adapter is merged in float32 before the one cast down; re-merging casts again") {
  const auto c = narrowest();
  const std::string suffix = c.suffix;
  CAPTURE(suffix);
  auto [model, reference] = twin(mlp);
  const auto originals = snapshot(*reference);
  const distorch::adapter_set adapters{{lora_on({"0", "2", "4"}), 0.8}};
  std::map<std::string, at::Tensor> merged;
  for (const auto& [name, t] : originals) merged.emplace(name, t.detach().clone());
  distorch::patch(merged, adapters, at::kCPU);  // lora/ directly, in float32
  CHECK_FALSE(test_models::bit_identical(merged.at("2.weight").to(c.scalar), originals.at("2.weight").to(c.scalar)));

  const std::uint64_t unit_bytes = distorch::bind_units(*model).units.total_bytes() / depth;
  auto pool = test_models::sim_pool(8 * depth * unit_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.adapters = adapters;
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0," + std::to_string(unit_bytes) + "b;cpu,*:" + suffix), spec);
  auto held = tensors_of(*model);
  CHECK(test_models::bit_identical(held.at("0.weight"), merged.at("0.weight")));  // compute-homed: float32, merged
  CHECK(test_models::bit_identical(held.at("2.weight"), merged.at("2.weight").to(c.scalar)));
  CHECK(test_models::bit_identical(held.at("4.weight"), merged.at("4.weight").to(c.scalar)));
  CHECK(test_models::bit_identical(held.at("6.weight"), originals.at("6.weight").to(c.scalar)));

  for (const auto& [name, t] : tensors_of(*reference)) {
    at::Tensor h = t;
    h.set_data(merged.at(name));
  }
  cast_homed_on(*reference, dm.plan(), device_id::cpu(), [&](const at::Tensor& t, const std::string&) { return t.to(c.scalar); });
  const at::Tensor x = (test_models::deterministic(), at::randn({3, width}));
  CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));

  // Strength 0 re-merges from the unpatched weights and casts them down again.
  dm.set_strength(0, 0.0);
  held = tensors_of(*model);
  CHECK(test_models::bit_identical(held.at("2.weight"), originals.at("2.weight").to(c.scalar)));
  CHECK(test_models::bit_identical(held.at("0.weight"), originals.at("0.weight")));
  CHECK(pool.used(device_id::cpu()) == 3 * (unit_bytes / 4 * c10::elementSize(c.scalar)));
}

#if defined(DISTORCH_TORCH_HAS_FLOAT8)
TEST_CASE("storage dtype: a bfloat16 model's patched weight is merged in float32 and rounded once, to float8") {
  auto [model, reference] = twin(mlp);
  model->to(at::kBFloat16);
  reference->to(at::kBFloat16);
  const auto originals = snapshot(*reference);
  const distorch::adapter_set adapters{{lora_on({"2"}), 1.0}};
  std::map<std::string, at::Tensor> merged;  // float32 copies, merged by lora/ in float32
  for (const auto& [name, t] : originals) merged.emplace(name, t.detach().to(at::kFloat));
  distorch::patch(merged, adapters, at::kCPU);
  const at::Tensor once = merged.at("2.weight").to(at::kFloat8_e4m3fn);
  const at::Tensor twice = merged.at("2.weight").to(at::kBFloat16).to(at::kFloat8_e4m3fn);
  CHECK_FALSE(test_models::bit_identical(once, twice));  // the test tells the two apart

  const std::uint64_t unit_bytes = distorch::bind_units(*model).units.total_bytes() / depth;
  auto pool = test_models::sim_pool(8 * depth * unit_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.adapters = adapters;
  spec.storage.homes = {{device_id::cpu(), dtype::f8_e4m3}};
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0," + std::to_string(unit_bytes) + "b;cpu,*"), spec);
  CHECK(test_models::bit_identical(tensors_of(*model).at("2.weight"), once));
  dm.residency().enter(1);
  CHECK(test_models::bit_identical(tensors_of(*model).at("2.weight"), once.to(at::kBFloat16)));
  dm.residency().leave(1);
}
#endif

TEST_CASE("round_stochastic: always a neighbour, unbiased, seeded; saturation, NaN, inf, zero and subnormals") {
  for (const auto& c : storage_cases()) {
    const std::string suffix = c.suffix;
    CAPTURE(suffix);
    const auto grid = finite_values(c.scalar);
    const double max = grid.back();
    const double min_sub = *std::upper_bound(grid.begin(), grid.end(), 0.0);
    // Magnitudes spread from below the smallest subnormal to beyond the largest finite value.
    const double lo_exp = std::log2(min_sub) - 2, hi_exp = std::min(std::log2(max) + 1, 127.5);  // finite in float32
    test_models::deterministic();
    const at::Tensor magnitudes = at::exp2(at::rand({4096}, at::kDouble).mul(hi_exp - lo_exp).add(lo_exp));
    const at::Tensor x = magnitudes.mul(at::randn({4096}, at::kDouble).sign()).to(at::kFloat);
    const auto xs = as_doubles(x);

    // Round to nearest even is LibTorch's own cast.
    CHECK(test_models::bit_identical(distorch::cast_for_storage(x, c.scalar, distorch::rounding_mode::nearest_even, 7, "w"), x.to(c.scalar)));

    // 300 draws of each value (more than one block of `stochastic_block` elements in all).
    constexpr std::int64_t draws = 300;
    const at::Tensor repeated = x.unsqueeze(0).expand({draws, x.numel()}).contiguous();
    REQUIRE(repeated.numel() > distorch::stochastic_block);
    const at::Tensor r = distorch::round_stochastic(repeated, c.scalar, 7);
    CHECK((r.scalar_type() == c.scalar));
    CHECK(test_models::bit_identical(r, distorch::round_stochastic(repeated, c.scalar, 7)));
    CHECK_FALSE(test_models::bit_identical(r, distorch::round_stochastic(repeated, c.scalar, 8)));
    CHECK(test_models::bit_identical(distorch::cast_for_storage(repeated, c.scalar, distorch::rounding_mode::stochastic, 7, "w"),
                                     distorch::round_stochastic(repeated, c.scalar, distorch::storage_seed(7, "w"))));
    const auto rs = as_doubles(r);
    std::size_t not_neighbour = 0, outside = 0;
    double total_z = 0, total_variance = 0;
    for (std::size_t j = 0; j < xs.size(); ++j) {
      const double v = std::clamp(xs[j], -max, max);  // finite values beyond the range saturate
      const auto [lo, hi] = neighbours(grid, v);
      double sum = 0;
      for (std::int64_t k = 0; k < draws; ++k) {
        const double y = rs[static_cast<std::size_t>(k) * xs.size() + j];
        if (y != lo && y != hi) ++not_neighbour;
        sum += y;
      }
      if (lo == hi) {
        CHECK(sum == lo * draws);
        continue;
      }
      // The share of draws that took `hi` estimates p = (v - lo) / (hi - lo). Per value: within
      // Hoeffding's bound for a 1e-9 chance, sqrt(ln(2e9) / (2 * 300)) = 0.19. Over all values the
      // sum of the errors is within 6 standard deviations of zero: no bias.
      const double p = (v - lo) / (hi - lo);
      const double z = (sum / draws - lo) / (hi - lo) - p;
      if (std::abs(z) > 0.19) ++outside;
      total_z += z;
      total_variance += p * (1 - p) / draws;
    }
    CHECK(not_neighbour == 0);
    CHECK(outside == 0);
    CHECK(std::abs(total_z) <= 6 * std::sqrt(total_variance));

    // Many draws of single values: subnormal, negative, and just below the largest finite value.
    const double spacing_top = max - grid[grid.size() - 2];
    for (const double v : {0.3 * min_sub, -2.7 * min_sub, 1.0 / 3.0, -0.7, max - 0.25 * spacing_top}) {
      CAPTURE(v);
      const auto [lo, hi] = neighbours(grid, v);
      REQUIRE(lo < hi);
      constexpr std::int64_t n = 1 << 18;
      const auto ys = as_doubles(distorch::round_stochastic(at::full({n}, v, at::kDouble), c.scalar, 11));
      double sum = 0;
      for (double y : ys) {
        CHECK((y == lo || y == hi));
        sum += y;
      }
      const double p = (v - lo) / (hi - lo);
      CHECK(std::abs(sum / n - v) <= 6 * (hi - lo) * std::sqrt(p * (1 - p) / n));
    }

    // Edges.
    const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
    const std::vector<double> edge_in{max, -max, 1.5 * max, -1e300, 0.0, -0.0, min_sub, -min_sub, inf, -inf, nan};
    const at::Tensor edges = at::tensor(edge_in, at::kDouble);
    for (int seed = 0; seed < 8; ++seed) {
      const auto out = as_doubles(distorch::round_stochastic(edges, c.scalar, seed));
      CHECK(out[0] == max);
      CHECK(out[1] == -max);
      CHECK(out[2] == max);  // saturates, where LibTorch's cast gives inf (or NaN for e4m3fn)
      CHECK(out[3] == -max);
      CHECK(out[6] == min_sub);
      CHECK(out[7] == -min_sub);
      CHECK(std::isnan(out[10]));
      // Infinities are cast as LibTorch casts them: float8_e4m3fn has none and gives NaN.
      const auto cast_inf = as_doubles(at::tensor(std::vector<double>{inf, -inf}, at::kDouble).to(c.scalar));
      for (int k = 0; k < 2; ++k) {
        if (std::isnan(cast_inf[k])) CHECK(std::isnan(out[8 + k]));
        else CHECK(out[8 + k] == cast_inf[k]);
      }
      const at::Tensor zeros = distorch::round_stochastic(edges.narrow(0, 4, 2), c.scalar, seed);
      CHECK(test_models::bit_identical(zeros, edges.narrow(0, 4, 2).to(c.scalar)));  // +0 and -0 keep their sign bit
    }
  }
}

TEST_CASE("storage dtype: stochastic rounding in DistributedModule is seeded per tensor and matches round_stochastic; forward parity") {
  const auto c = narrowest();
  const std::string suffix = c.suffix;
  CAPTURE(suffix);
  auto load = [&](std::uint64_t seed) {
    auto [model, reference] = twin(mlp);
    const std::uint64_t unit_bytes = distorch::bind_units(*model).units.total_bytes() / depth;
    auto pool = test_models::sim_pool(8 * depth * unit_bytes);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.storage.rounding = distorch::rounding_mode::stochastic;
    spec.storage.seed = seed;
    auto dm = std::make_unique<distorch::DistributedModule<torch::nn::Sequential>>(
        model, pool, distorch::policy_from_string("sim:0," + std::to_string(unit_bytes) + "b;cpu,*:" + suffix), spec);
    return std::make_tuple(std::move(dm), model, reference);
  };
  auto [dm, model, reference] = load(42);
  const auto originals = snapshot(*reference);
  const auto held = tensors_of(*model);
  const at::Tensor nearest = originals.at("2.weight").to(c.scalar);
  const at::Tensor stochastic = distorch::round_stochastic(originals.at("2.weight"), c.scalar, distorch::storage_seed(42, "2.weight"));
  CHECK(test_models::bit_identical(held.at("2.weight"), stochastic));
  CHECK_FALSE(test_models::bit_identical(held.at("2.weight"), nearest));

  auto [same, same_model, same_reference] = load(42);
  for (const auto& [name, t] : tensors_of(*same_model)) CHECK(test_models::bit_identical(t, held.at(name)));
  auto [other, other_model, other_reference] = load(43);
  CHECK_FALSE(test_models::bit_identical(tensors_of(*other_model).at("2.weight"), held.at("2.weight")));

  cast_homed_on(*reference, dm->plan(), device_id::cpu(), [&](const at::Tensor& t, const std::string& name) {
    return distorch::round_stochastic(t, c.scalar, distorch::storage_seed(42, name));
  });
  const at::Tensor x = (test_models::deterministic(), at::randn({3, width}));
  CHECK(test_models::bit_identical(dm->forward(x), reference->forward(x)));
}

TEST_CASE("storage dtype: integer and bool buffers keep their dtype; floating buffers are stored narrower; conv net parity") {
  const auto c = narrowest();
  auto [model, reference] = twin([] { return test_models::conv_net(); });
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
  auto pool = test_models::sim_pool(4 * model_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.storage.homes = {{device_id::sim(1), c.type}};
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,1b;sim:1,*"), spec);
  const auto held = tensors_of(*model);
  REQUIRE(held.count("1.num_batches_tracked") == 1);
  CHECK(dm.plan().units[1].device == device_id::sim(1));
  CHECK((held.at("1.num_batches_tracked").scalar_type() == at::kLong));
  CHECK((held.at("1.running_var").scalar_type() == c.scalar));
  CHECK(dm.plan().units[2].device == device_id::sim(1));
  CHECK((held.at("3.weight").scalar_type() == c.scalar));
  cast_homed_on(*reference, dm.plan(), device_id::sim(1), [&](const at::Tensor& t, const std::string&) { return t.to(c.scalar); });
  const at::Tensor x = (test_models::deterministic(), at::randn({2, 3, 8, 8}));
  CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
  CHECK((tensors_of(*model).at("1.num_batches_tracked").scalar_type() == at::kLong));
}

TEST_CASE("storage dtype: unload, reload and replan keep the stored form; moving to the compute device casts back") {
  const auto c = narrowest();
  const std::string suffix = c.suffix;
  auto [model, reference] = twin(mlp);
  const auto originals = snapshot(*reference);
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
  const std::uint64_t unit_bytes = model_bytes / depth;
  auto pool = test_models::sim_pool(2 * model_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  const std::string policy = "sim:0," + std::to_string(unit_bytes) + "b;sim:1," + std::to_string(unit_bytes) + "b;cpu,*:" + suffix;
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string(policy), spec);
  CHECK(dm.plan().units[1].device == device_id::cpu());     // "2": stored narrower
  CHECK(dm.plan().units[3].device == device_id::sim(1));    // "6": sim:1 has no storage dtype
  CHECK((tensors_of(*model).at("6.weight").scalar_type() == at::kFloat));
  cast_homed_on(*reference, dm.plan(), device_id::cpu(), [&](const at::Tensor& t, const std::string&) { return t.to(c.scalar); });
  const at::Tensor x = (test_models::deterministic(), at::randn({3, width}));
  const at::Tensor expected = reference->forward(x);
  CHECK(test_models::bit_identical(dm.forward(x), expected));

  dm.unload();
  CHECK(pool.used(device_id::sim(0)) == 0);
  CHECK(test_models::bit_identical(dm.forward(x), expected));  // reloads by itself

  // A policy asking another storage dtype than the one loaded is refused; nothing moves.
  const std::string other = c.type == dtype::bf16 ? "fp16" : "bf16";
  CHECK_THROWS_AS(dm.replan(distorch::policy_from_string("sim:0,1b;cpu,*:" + other)), distorch::placement_error);
  dm.replan(distorch::policy_from_string(policy));
  CHECK(test_models::bit_identical(dm.forward(x), expected));

  // Everything to the compute device: stored units are cast back there, and stay float32.
  dm.replan(distorch::policy_from_string("sim:0," + std::to_string(model_bytes + 16) + "b;cpu,*"));
  for (const auto& u : dm.plan().units) {
    CHECK(u.device == device_id::sim(0));
    CHECK(u.bytes == unit_bytes);
  }
  CHECK(pool.used(device_id::sim(0)) == model_bytes);
  CHECK(pool.used(device_id::cpu()) == 0);
  const auto held = tensors_of(*model);
  CHECK(test_models::bit_identical(held.at("2.weight"), originals.at("2.weight").to(c.scalar).to(at::kFloat)));
  CHECK(test_models::bit_identical(held.at("6.weight"), originals.at("6.weight")));
  CHECK(test_models::bit_identical(dm.forward(x), expected));
}

TEST_CASE("storage dtype: rejected configurations are placement_errors and leave the module as it was") {
  auto pool = test_models::sim_pool(64ull << 20);
  auto attempt = [&](const std::string& policy, std::vector<distorch::device_storage> homes) {
    CAPTURE(policy);
    auto model = mlp();
    const auto before = test_models::checksum(*model);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.storage.homes = std::move(homes);
    try {
      distorch::DistributedModule dm(model, pool, distorch::policy_from_string(policy), spec);
    } catch (const distorch::placement_error& e) {
      CHECK(test_models::checksum(*model) == before);
      CHECK(pool.used(device_id::cpu()) == 0);
      CHECK(!e.info().fix.empty());
      return e.info().problem;
    }
    return std::string("<loaded>");
  };
  CHECK(attempt("sim:0,1kb:bf16;cpu,*", {}).find("compute device") != std::string::npos);
  CHECK(attempt("sim:0,1kb;cpu,*", {{device_id::sim(0), dtype::f16}}).find("compute device") != std::string::npos);
  CHECK(attempt("sim:0,1kb;cpu,*:fp16", {{device_id::cpu(), dtype::bf16}}).find("spec.storage") != std::string::npos);
  CHECK(attempt("sim:0,1kb;cpu,*", {{device_id::cuda(3), dtype::bf16}}).find("not in the device pool") != std::string::npos);
  CHECK(attempt("sim:0,1kb;cpu,*", {{device_id::cpu(), dtype::bf16}, {device_id::cpu(), dtype::f16}}).find("named twice") !=
        std::string::npos);
  CHECK(attempt("sim:0,1kb;cpu,*", {{device_id::cpu(), dtype::i8}}).find("not a storage dtype") != std::string::npos);
  CHECK(attempt("sim:0,1kb;cpu,*:bf16", {{device_id::cpu(), dtype::bf16}}) == "<loaded>");  // named twice, agreeing
#if !defined(DISTORCH_TORCH_HAS_FLOAT8)
  // LibTorch 1.13 .. 2.0: float8 storage is a clear error naming the version needed; bf16 / fp16 work.
  for (const auto& problem : {attempt("sim:0,1kb;cpu,*:fp8", {}), attempt("sim:0,1kb;cpu,*", {{device_id::cpu(), dtype::f8_e5m2}})}) {
    CHECK(problem.find("float8 storage needs LibTorch 2.1 or newer") != std::string::npos);
    CHECK(problem.find(TORCH_VERSION) != std::string::npos);
  }
  CHECK(attempt("sim:0,1kb;cpu,*:fp16", {}) == "<loaded>");
#endif
}
