// The streaming rules of docs/streaming.md that a model written by its user relies on: strict
// simulated devices, plain torch::nn models, the distorch::nn drop-in, staging modules outside a
// block loop, tied weights, memory formats, concurrent forwards, the learned order, buffers.
#include "models.hpp"

#include <torch/nn/functional/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include "distorch/core/log.hpp"
#include "distorch/io/open.hpp"
#include "distorch/io/torch_tensor.hpp"
#include "distorch/runtime/distributed_module.hpp"
#include "distorch/runtime/streamed_view.hpp"
#include "support/captured_log.hpp"
#include "support/test_files.hpp"

#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>

#include <doctest/doctest.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

using distorch::device_id;

namespace plain_model {
namespace nn = torch::nn;
#include "user_model.inc"
}  // namespace plain_model

namespace streamed_model {
namespace nn = distorch::nn;
#include "user_model.inc"
}  // namespace streamed_model

namespace {

using distorch_test::captured_log;

bool mentions(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// A plan putting the units whose names start with any of `donor_prefixes` on `donor`, the rest on sim:0.
distorch::placement_plan plan_by_prefix(const distorch::inventory& inv, const std::vector<std::string>& donor_prefixes,
                                        const device_id& donor) {
  distorch::placement_plan plan;
  plan.compute = device_id::sim(0);
  plan.policy = "by prefix (test)";
  for (const auto& u : inv.units()) {
    bool off = false;
    for (const auto& p : donor_prefixes) off = off || u.name.rfind(p, 0) == 0;
    plan.units.push_back({u.name, off ? donor : device_id::sim(0), u.bytes, distorch::placement_reason::policy});
  }
  return plan;
}

}  // namespace

TEST_CASE("distorch::nn is a drop-in: the same model file streams after `namespace nn = distorch::nn;`") {
  test_models::deterministic();
  plain_model::user_model plain(64, 32, 4);
  test_models::deterministic();
  streamed_model::user_model streamed(64, 32, 4);
  plain->eval();
  streamed->eval();
  // Same initialisation order, same weights: the alias changed nothing but the layer types.
  CHECK(test_models::checksum(*plain) == test_models::checksum(*streamed));
  static_assert(std::is_same_v<distorch::nn::ModuleList, torch::nn::ModuleList>);
  static_assert(std::is_same_v<distorch::nn::LinearOptions, torch::nn::LinearOptions>);
  static_assert(std::is_base_of_v<torch::nn::LinearImpl, distorch::nn::Linear::ContainedType>);
  static_assert(!std::is_same_v<distorch::nn::Linear, torch::nn::Linear>);

  const at::Tensor tokens = at::arange(12, at::kLong).remainder(64).reshape({2, 6});
  const at::Tensor expected = plain->forward(tokens);
  const std::uint64_t total = distorch::bind_units(*streamed).units.total_bytes();
  auto pool = test_models::sim_pool(total / 2);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.planning.tiny_ppm = 0;
  distorch::DistributedModule dm(streamed, pool, distorch::policy_from_string("sim:0,16kb;cpu,*"), spec);
  for (int k = 0; k < 3; ++k) CHECK(test_models::bit_identical(dm.forward(tokens), expected));
  CHECK(pool.peak(device_id::sim(0)) < total / 2);
  CHECK(dm.stats().fetches > 0);
}

TEST_CASE("a plain torch::nn model is never staged whole silently: refused when it does not fit, a warning once when it does") {
  test_models::deterministic();
  plain_model::user_model model(64, 32, 4);
  model->eval();
  const at::Tensor tokens = at::arange(8, at::kLong).reshape({2, 4});
  const at::Tensor expected = model->forward(tokens);
  const std::uint64_t before = test_models::checksum(*model);
  const std::uint64_t total = distorch::bind_units(*model).units.total_bytes();
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.planning.tiny_ppm = 0;

  SUBCASE("does not fit: placement_error naming the largest submodules and the three ways, nothing moved") {
    auto pool = test_models::sim_pool(total / 2);
    try {
      distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,16kb;cpu,*"), spec);
      FAIL("expected a placement_error");
    } catch (const distorch::placement_error& e) {
      const std::string what = e.what();
      CHECK(mentions(what, "plain torch::nn layers"));
      CHECK(mentions(what, "largest: blocks.1.up"));  // the largest first (blocks.0.up stays on sim:0)
      CHECK(mentions(what, "namespace nn = distorch::nn;"));
      CHECK(mentions(what, "views::streamed"));
      CHECK(mentions(what, "Streamed<Impl>"));
    }
    for (const auto& d : pool.devices()) CHECK(d.budget->used() == 0);
    CHECK(test_models::checksum(*model) == before);
    CHECK(test_models::bit_identical(model->forward(tokens), expected));
  }
  SUBCASE("fits: staged around the call, reported once") {
    auto pool = test_models::sim_pool(4 * total);
    captured_log log;
    distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,16kb;cpu,*"), spec);
    for (int k = 0; k < 3; ++k) CHECK(test_models::bit_identical(dm.forward(tokens), expected));
    REQUIRE(log.warnings.size() == 1);
    CHECK(mentions(log.warnings[0], "plain torch::nn layers"));
    CHECK(pool.peak(device_id::sim(0)) <= pool.capacity(device_id::sim(0)));
  }
  SUBCASE("the caller stages: no check, and forward leaves them to the caller") {
    auto pool = test_models::sim_pool(total / 2);
    spec.uncovered = distorch::uncovered_units::caller_stages;
    distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,16kb;cpu,*"), spec);
    // Nothing stages the plain layers now: the strict simulated device names the first one used.
    try {
      dm.forward(tokens);
      FAIL("expected a device_error");
    } catch (const distorch::device_error& e) {
      CHECK(mentions(e.what(), "not staged on sim:0"));
    }
  }
}

TEST_CASE("strict simulated devices: a head or an embedding outside a views::streamed loop must be staged, and forgetting it is an error naming it") {
  auto [model, reference] = test_models::twin([] { return test_models::transformer(); });
  auto pool = test_models::sim_pool(1 << 20);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.grouping = {{R"(blocks\.\d+)"}};
  spec.planning.tiny_ppm = 0;
  const auto inv = distorch::bind_units(*model, spec.grouping).units;
  distorch::DistributedModule<distorch::demo::tiny_transformer> dm(model, pool, plan_by_prefix(inv, {"embed", "blocks", "head"}, device_id::cpu()),
                                                                  spec);
  const at::Tensor x = at::randn({1, 4, 16});
  const at::Tensor expected = reference->forward(x);
  auto run_blocks = [&](at::Tensor h) {
    for (auto& block : *model->blocks | distorch::views::streamed(dm)) h = block->as<distorch::demo::attention_block_impl>()->forward(h);
    return h;
  };
  auto expect_unstaged = [](auto&& call, const std::string& unit) {
    try {
      call();
      FAIL("expected a device_error naming " << unit);
    } catch (const distorch::device_error& e) {
      CHECK(mentions(e.what(), "unit '" + unit + "'"));
      CHECK(mentions(e.what(), "not staged on sim:0"));
      CHECK(mentions(e.what(), "dm.stage(module)"));
    }
  };
  // The head homed on cpu, called directly: the simulated device refuses as a GPU would.
  at::Tensor h;
  {
    auto staged = dm.stage(*model->embed);
    h = run_blocks(model->embed->as<torch::nn::LinearImpl>()->forward(x));  // Impl::forward, but staged by the scope
  }
  const at::Tensor normed = model->norm(h);
  expect_unstaged([&] { (void)model->head->as<torch::nn::LinearImpl>()->forward(normed); }, "head");
  expect_unstaged([&] { (void)model->embed->as<torch::nn::LinearImpl>()->forward(x); }, "embed");
  {
    auto staged = dm.stage(*model->head);
    CHECK(dm.residency().resident(dm.units_of(*model->head).at(0)));
    CHECK(test_models::bit_identical(model->head->as<torch::nn::LinearImpl>()->forward(normed), expected));
  }
  // Released again: back behind the tripwire, with nothing left booked on sim:0 but resident units.
  for (std::size_t u = 0; u < inv.size(); ++u) CHECK(dm.residency().resident(u) == !dm.residency().streams(u));
  // The streamed holders stage themselves, so the ordinary calls need no scope.
  at::Tensor y = model->head(model->norm(run_blocks(model->embed(x))));
  CHECK(test_models::bit_identical(y, expected));
  // A module that is not part of the model.
  distorch::nn::Linear stranger(4, 4);
  CHECK_THROWS_AS((void)dm.stage(*stranger), distorch::placement_error);
}

namespace {

struct plain_block_impl : torch::nn::Module {
  explicit plain_block_impl(std::int64_t width) : fc(register_module("fc", torch::nn::Linear(width, width))) {}
  at::Tensor forward(const at::Tensor& x) { return fc(x).tanh(); }
  torch::nn::Linear fc;
};
using streamed_block = torch::nn::ModuleHolder<distorch::nn::Streamed<plain_block_impl>>;

struct block_stack_impl : torch::nn::Module {
  explicit block_stack_impl(int n) : blocks(register_module("blocks", torch::nn::ModuleList())) {
    for (int i = 0; i < n; ++i) blocks->push_back(streamed_block(16));
  }
  at::Tensor forward(at::Tensor x) {
    for (const auto& b : *blocks) x = b->as<distorch::nn::Streamed<plain_block_impl>>()->forward(x);
    return x;
  }
  torch::nn::ModuleList blocks;
};
TORCH_MODULE_IMPL(block_stack, block_stack_impl);

}  // namespace

TEST_CASE("calling Impl::forward of a Streamed<Impl> past its staging is caught on a simulated device") {
  test_models::deterministic();
  block_stack model(3);
  auto pool = test_models::sim_pool(1 << 20);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  const auto inv = distorch::bind_units(*model).units;
  distorch::DistributedModule<block_stack> dm(model, pool, plan_by_prefix(inv, {"blocks.1"}, device_id::cpu()), spec);
  const at::Tensor x = at::randn({2, 16});
  const at::Tensor y = dm.forward(x);  // Streamed<plain_block_impl>::forward stages each block
  CHECK(y.sizes() == x.sizes());
  try {
    (void)model->blocks[1]->as<plain_block_impl>()->forward(x);  // skips Streamed::forward
    FAIL("expected a device_error");
  } catch (const distorch::device_error& e) {
    CHECK(mentions(e.what(), "unit 'blocks.1.fc'"));
  }
  (void)model->blocks[0]->as<plain_block_impl>()->forward(x);  // resident on sim:0: nothing to stage
}

namespace {

// An output head computing with a weight it is given (registered under its own name too).
struct tied_head_impl : torch::nn::Module {
  tied_head_impl(const at::Tensor& shared, std::int64_t vocab)
      : weight(register_parameter("weight", shared)), bias(register_parameter("bias", at::zeros({vocab}))) {}
  at::Tensor forward(const at::Tensor& x) { return x.matmul(weight.t()) + bias; }
  at::Tensor weight, bias;
};
using tied_head = torch::nn::ModuleHolder<distorch::nn::Streamed<tied_head_impl>>;

// An embedding and an output head sharing one weight (the usual LLM layout), a block between.
struct tied_lm_impl : torch::nn::Module {
  tied_lm_impl(std::int64_t vocab, std::int64_t width)
      : embed(register_module("embed", distorch::nn::Embedding(vocab, width))),
        mid(register_module("mid", distorch::nn::Linear(width, width))),
        head(register_module("head", tied_head(embed->weight, vocab))) {}
  at::Tensor forward(const at::Tensor& tokens) { return head(mid(embed(tokens)).tanh()); }
  distorch::nn::Embedding embed;
  distorch::nn::Linear mid;
  tied_head head;
};
TORCH_MODULE_IMPL(tied_lm, tied_lm_impl);

}  // namespace

TEST_CASE("a weight tied between an embedding and a head is fetched for either, switched for both, booked once") {
  for (const device_id home : {device_id::cpu(), device_id::sim(1)})
    for (std::size_t depth : {0u, 1u, 2u}) {
      CAPTURE(home.str());
      CAPTURE(depth);
      auto [model, reference] = test_models::twin([] { return tied_lm(48, 16); });
      REQUIRE(model->head->weight.is_same(model->embed->weight));
      auto pool = test_models::sim_pool(1 << 20);
      distorch::distribute_spec spec;
      spec.compute = device_id::sim(0);
      spec.streaming.prefetch_depth = depth;
      const auto inv = distorch::bind_units(*model).units;
      // The tied weight pulls embed and head into one unit; it lives on `home`, `mid` on sim:0.
      REQUIRE(inv.size() == 2);
      const auto& tied = inv[0];
      CHECK(tied.name == "embed");
      distorch::DistributedModule<tied_lm> dm(model, pool, plan_by_prefix(inv, {"embed"}, home), spec);
      CHECK(dm.units_of(*model->head) == std::vector<std::size_t>{0});
      CHECK(dm.units_of(*model->embed) == std::vector<std::size_t>{0});
      // Booked once at home: the weight (48 × 16 floats) and the head's bias.
      CHECK(pool.used(home) == tied.bytes);
      CHECK(tied.bytes == (48 * 16 + 48) * sizeof(float));
      const at::Tensor tokens = at::arange(6, at::kLong).reshape({1, 6});
      const at::Tensor expected = reference->forward(tokens);
      const std::uint64_t home_used = pool.used(home);
      for (int k = 0; k < 3; ++k) {
        dm.reset_stats();
        CHECK(test_models::bit_identical(dm.forward(tokens), expected));
        // Fetched for the embedding, released while `mid` runs, fetched again for the head.
        if (depth == 0) CHECK(dm.stats().fetches == 2);
        CHECK(dm.stats().bytes_fetched >= tied.bytes);
        CHECK(pool.used(home) == home_used);
        // After the call `mid` stays, and with depth > 0 the tied unit fetched ahead for the next call.
        CHECK(pool.used(device_id::sim(0)) == inv[1].bytes + test_models::fetched_ahead(dm.residency()));
        if (k > 0 && depth > 0) CHECK(dm.stats().prefetch_misses == 0);
      }
      CHECK(pool.peak(device_id::sim(0)) <= inv[1].bytes + tied.bytes * (depth + 1));
    }
}

TEST_CASE("fetched copies keep the home tensor's strides: channels_last stays channels_last, through the ring too") {
  auto pool = test_models::sim_pool(1 << 20);
  const at::Tensor weight = at::randn({8, 4, 3, 3}).contiguous(at::MemoryFormat::ChannelsLast);
  for (const std::uint64_t ring : {std::uint64_t{0}, std::uint64_t{4096}}) {
    CAPTURE(ring);
    const device_id home = ring ? device_id::cpu() : device_id::sim(1);
    distorch::residency_unit u;
    u.name = "conv";
    u.home = home;
    u.home_data.push_back(distorch::booked_copy_allocator{}.copy_to(weight, pool, pool.at(home), {false, false, "placing"}));
    u.handles.push_back(u.home_data.back().data.detach());
    u.bytes = static_cast<std::uint64_t>(weight.numel()) * weight.element_size();
    CHECK(u.home_data[0].data.is_contiguous(at::MemoryFormat::ChannelsLast));
    at::Tensor handle = u.handles[0];
    std::vector<distorch::residency_unit> units;
    units.push_back(std::move(u));
    distorch::residency_manager manager(pool, device_id::sim(0), std::move(units), {.prefetch_depth = 0, .staging_ring_bytes = ring});
    manager.enter(0);
    CHECK(handle.is_contiguous(at::MemoryFormat::ChannelsLast));
    CHECK(handle.strides() == weight.strides());
    CHECK(at::equal(handle, weight));
    if (ring) CHECK(manager.stats().ring_chunks > 0);
    manager.leave(0);
  }
}

TEST_CASE("two threads running forward on one DistributedModule get the outputs of serial runs, bit for bit") {
  for (std::size_t depth : {0u, 1u, 2u}) {
    CAPTURE(depth);
    auto [model, reference] = test_models::twin([] { return test_models::mlp_stack(32, 8); });
    auto pool = test_models::sim_pool(1 << 20);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.streaming.prefetch_depth = depth;
    spec.planning.tiny_ppm = 0;
    distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,8kb;cpu,*"), spec);
    std::vector<at::Tensor> inputs, expected;
    for (int k = 0; k < 16; ++k) {
      inputs.push_back(at::randn({2, 32}));
      expected.push_back(reference->forward(inputs.back()));
    }
    std::vector<at::Tensor> got(inputs.size());
    std::atomic<int> failures{0};
    auto run = [&](std::size_t first) {
      try {
        for (std::size_t k = first; k < inputs.size(); k += 2) got[k] = dm.forward(inputs[k]);
      } catch (...) {
        ++failures;
      }
    };
    std::thread a(run, 0), b(run, 1);
    a.join();
    b.join();
    CHECK(failures == 0);
    for (std::size_t k = 0; k < inputs.size(); ++k) CHECK(test_models::bit_identical(got[k], expected[k]));
    CHECK(!dm.residency().any_running());
    CHECK(pool.peak(device_id::sim(0)) <= pool.capacity(device_id::sim(0)));
  }
}

namespace {

struct callback_impl : torch::nn::Module {
  std::function<void()> call;
  at::Tensor forward(const at::Tensor& x) {
    if (call) call();
    return x;
  }
};
TORCH_MODULE_IMPL(callback, callback_impl);

}  // namespace

TEST_CASE("replan, unload and adapter changes are refused with a clear error while a forward runs on another thread") {
  test_models::deterministic();
  torch::nn::Sequential model(distorch::nn::Linear(16, 16), callback(), distorch::nn::Linear(16, 16));
  auto pool = test_models::sim_pool(1 << 20);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.planning.tiny_ppm = 0;
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,1kb;cpu,*"), spec);
  std::vector<std::string> refused;
  model[1]->as<callback_impl>()->call = [&] {
    std::thread other([&] {
      auto attempt = [&](auto&& f) {
        try {
          f();
        } catch (const distorch::placement_error& e) {
          refused.emplace_back(e.what());
        }
      };
      attempt([&] { dm.replan(distorch::policy_from_string("sim:0,*")); });
      attempt([&] { dm.unload(); });
      attempt([&] { dm.set_adapters({}); });
    });
    other.join();
  };
  const at::Tensor x = at::randn({1, 16});
  const at::Tensor before = dm.forward(x);
  REQUIRE(refused.size() == 3);
  for (const auto& r : refused) CHECK(mentions(r, "a forward is running"));
  model[1]->as<callback_impl>()->call = nullptr;
  dm.replan(distorch::policy_from_string("sim:0,*"));  // between forwards it works
  CHECK(test_models::bit_identical(dm.forward(x), before));
}

namespace {

// Linear layers run in a sequence that may repeat a layer or change between calls.
struct sequence_model_impl : torch::nn::Module {
  explicit sequence_model_impl(int n) {
    for (int i = 0; i < n; ++i) layers.push_back(register_module("l" + std::to_string(i), distorch::nn::Linear(16, 16)));
  }
  at::Tensor forward(at::Tensor x) {
    for (int i : sequence) x = layers.at(static_cast<std::size_t>(i))(x).tanh();
    return x;
  }
  std::vector<distorch::nn::Linear> layers;
  std::vector<int> sequence;
};
TORCH_MODULE_IMPL(sequence_model, sequence_model_impl);

}  // namespace

TEST_CASE("the learned order is cyclic, repeats a unit run twice, and re-learns when the calls change") {
  for (std::size_t depth : {1u, 2u}) {
    CAPTURE(depth);
    auto [model, reference] = test_models::twin([] { return sequence_model(5); });
    auto pool = test_models::sim_pool(1 << 20);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.streaming.prefetch_depth = depth;
    const auto inv = distorch::bind_units(*model).units;
    distorch::DistributedModule<sequence_model> dm(model, pool, plan_by_prefix(inv, {"l"}, device_id::sim(1)), spec);  // all on the donor
    const at::Tensor x = at::randn({2, 16});
    auto run = [&](std::vector<int> sequence) {
      model->sequence = sequence;
      reference->sequence = sequence;
      dm.reset_stats();
      CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
      return dm.stats();
    };
    SUBCASE("every unit homed off the compute device: no miss after the first forward") {
      CHECK(run({0, 1, 2, 3, 4}).prefetch_misses == 5);
      for (int k = 0; k < 3; ++k) {
        const auto s = run({0, 1, 2, 3, 4});
        CHECK(s.prefetch_misses == 0);
        CHECK(s.prefetch_hits == 5);
      }
    }
    SUBCASE("a unit entered twice in one forward is prefetched at each position") {
      run({0, 1, 0, 2});
      CHECK(dm.residency().learned_order() == std::vector<std::size_t>{0, 1, 0, 2});
      for (int k = 0; k < 3; ++k) CHECK(run({0, 1, 0, 2}).prefetch_misses == 0);
    }
    SUBCASE("a changed sequence costs misses, never wrong weights, and is learned again") {
      run({0, 1, 2});
      run({0, 1, 2});
      CHECK(run({2, 1, 0}).prefetch_misses > 0);  // the same units in another order: resynchronised
      CHECK(run({3, 4}).prefetch_misses > 0);     // units the order never saw: learned afresh
      run({3, 4});
      CHECK(run({3, 4}).prefetch_misses == 0);
    }
  }
}

// ---- buffers -------------------------------------------------------------------------------------

namespace {

// Writes two buffers in forward, as a KV cache or a step counter would.
struct cache_writerImpl : torch::nn::Module {
  explicit cache_writerImpl(std::int64_t width) {
    weight = register_parameter("weight", at::randn({width}));
    last = register_buffer("last", at::zeros({width}));
    steps = register_buffer("steps", at::zeros({1}, at::kLong));
  }
  at::Tensor forward(const at::Tensor& x) {
    last.copy_(x.sum(0));
    steps.add_(1);
    return x + weight;
  }
  at::Tensor weight, last, steps;
};
TORCH_MODULE(cache_writer);

// Scales by a non-persistent buffer the module computes itself (rotary inv_freq style).
struct freq_scaleImpl : torch::nn::Module {
  explicit freq_scaleImpl(std::int64_t width) {
    inv_freq = register_buffer("inv_freq", at::arange(0, width, at::kFloat).div(width).neg().exp());
  }
  at::Tensor forward(const at::Tensor& x) { return x * inv_freq; }
  at::Tensor inv_freq;
};
TORCH_MODULE(freq_scale);

// The buffers of `module` by name, read inside a staging scope (strict handles refuse reads otherwise).
template <class DM>
std::vector<std::pair<std::string, at::Tensor>> staged_buffers(DM& dm, torch::nn::Module& module) {
  auto staged = dm.stage(module);
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& b : module.named_buffers(true)) out.emplace_back(b.key(), b.value().clone());
  return out;
}

}  // namespace

TEST_CASE("buffers forward writes go back home at release: BatchNorm running statistics in training, a cache in eval") {
  auto make = [] { return torch::nn::Sequential(distorch::nn::Linear(8, 8), torch::nn::BatchNorm1d(8), cache_writer(8)); };
  auto [model, reference] = test_models::twin(make);
  auto pool = test_models::sim_pool(1 << 20);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  const auto inv = distorch::bind_units(*model).units;
  REQUIRE(inv.size() == 3);
  // Every unit homed on cpu: each is fetched for its call and released after it.
  distorch::DistributedModule<torch::nn::Sequential> dm(model, pool, plan_by_prefix(inv, {""}, device_id::cpu()), spec);
  at::manual_seed(7);
  for (int k = 0; k < 3; ++k) {
    const at::Tensor x = at::randn({4, 8});
    CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
  }
  // Training mode: BatchNorm's running mean, variance and batch count, and the cache, all came home.
  CHECK(dm.stats().buffers_written_back == 3 * 5);
  auto check_buffers = [&] {
    for (std::size_t m : {1u, 2u}) {
      const auto got = staged_buffers(dm, *model->ptr(m));
      const auto want = reference->ptr(m)->named_buffers(true);
      REQUIRE(got.size() == want.size());
      for (const auto& [name, value] : got) {
        CAPTURE(name);
        CHECK(test_models::bit_identical(value, want[name]));
      }
    }
  };
  check_buffers();
  // In eval mode BatchNorm computes with those statistics; only the cache still writes its two
  // buffers, and a unit whose buffers nothing wrote is not copied back.
  model->eval();
  reference->eval();
  dm.reset_stats();
  const at::Tensor x = at::randn({4, 8});
  CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
  CHECK(dm.stats().buffers_written_back == 2);
  check_buffers();
  CHECK(staged_buffers(dm, *model->ptr(2))[1].second.item<std::int64_t>() == 4);  // the step counter
}

TEST_CASE("non-persistent buffers keep the module's values and are not required from weight files; a wrong rule is an error naming it") {
  auto make = [] { return torch::nn::Sequential(distorch::nn::Linear(8, 8), freq_scale(8)); };
  auto [generated, reference] = test_models::twin(make);
  distorch_test::temp_dir dir{"runtime"};
  auto tensors = distorch::demo::named_tensors(*generated);
  std::erase_if(tensors, [](const auto& t) { return t.first == "1.inv_freq"; });
  REQUIRE(tensors.size() == 2);
  const std::string path = (dir.path / "model.safetensors").string();
  distorch::save_safetensors(path, tensors);

  auto pool = test_models::sim_pool(1 << 20);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.weights = {distorch::open_weights(path)};
  const auto policy = distorch::policy_from_string("sim:0,50%;cpu,50%");
  auto fresh = [&] {
    at::manual_seed(5);  // other weights: they must come from the file
    return make();
  };
  // Without a rule the file lacks a tensor, and the error says how to name it.
  try {
    distorch::DistributedModule<torch::nn::Sequential> dm(fresh(), pool, policy, spec);
    FAIL("expected format_error");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().subject == "1.inv_freq");
    CHECK(mentions(e.what(), "spec.non_persistent"));
  }
  // A rule that matches nothing, or a parameter: format_error naming the rule; nothing booked.
  for (const std::string& rule : {std::string(R"(\d+\.rope\.inv_freq)"), std::string(R"(0\.weight)"), std::string("(")}) {
    CAPTURE(rule);
    spec.non_persistent = {rule};
    try {
      distorch::DistributedModule<torch::nn::Sequential> dm(fresh(), pool, policy, spec);
      FAIL("expected format_error");
    } catch (const distorch::format_error& e) {
      CHECK(e.info().subject == rule);
    }
    for (const auto& d : pool.devices()) CHECK(d.budget->used() == 0);
  }
  spec.non_persistent = {R"(\d+\.inv_freq)"};
  auto model = fresh();
  distorch::DistributedModule<torch::nn::Sequential> dm(model, pool, policy, spec);
  const at::Tensor x = at::randn({3, 8});
  CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
}

namespace {

// A custom model around a Sequential, so that DistributedModule finds its layers by type.
struct wrapped_stackImpl : torch::nn::Module {
  explicit wrapped_stackImpl(torch::nn::Sequential s) : body(register_module("body", std::move(s))) {}
  at::Tensor forward(const at::Tensor& x) { return body->forward(x); }
  torch::nn::Sequential body;
};
TORCH_MODULE(wrapped_stack);

}  // namespace

TEST_CASE("Streamed<Impl>::clone() gives a module that still streams: a layer, and a Sequential of them") {
  test_models::deterministic();
  distorch::nn::Linear fc(8, 8);
  const auto copy = fc->clone();
  CHECK(dynamic_cast<distorch::nn::streamed_module*>(copy.get()) != nullptr);
  const auto* linear = dynamic_cast<torch::nn::LinearImpl*>(copy.get());
  REQUIRE(linear != nullptr);
  CHECK(test_models::bit_identical(linear->weight, fc->weight));
  CHECK_FALSE(linear->weight.is_same(fc->weight));  // a deep copy
  CHECK(linear->weight.data_ptr() != fc->weight.data_ptr());

  // Sequential::clone clones each child through its holder: every layer is still streamed, and a
  // model built on the clone streams layer by layer, with no warning about plain layers.
  auto original = test_models::mlp_stack(16, 4);
  const auto cloned = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(original->clone());
  REQUIRE(cloned != nullptr);
  auto model = wrapped_stack(torch::nn::Sequential(cloned));
  const at::Tensor x = at::randn({2, 16});
  const at::Tensor expected = original->forward(x);
  captured_log log;
  auto pool = test_models::sim_pool(1 << 20);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  const auto inv = distorch::bind_units(*model).units;
  distorch::DistributedModule<wrapped_stack> dm(model, pool, plan_by_prefix(inv, {"body.2", "body.4", "body.6"}, device_id::cpu()), spec);
  CHECK(log.warnings.empty());
  for (int k = 0; k < 2; ++k) CHECK(test_models::bit_identical(dm.forward(x), expected));
  CHECK(dm.stats().fetches > 0);
  CHECK(pool.peak(device_id::sim(0)) < inv.total_bytes());
}
