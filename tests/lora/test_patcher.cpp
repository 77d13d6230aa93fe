// The patcher (lora/patcher.hpp): per-unit patching, bit-exact unpatch from kept originals and from
// the source file, strength 0, strength changes that re-merge only what an adapter touches, and
// the stateless patch(weights, adapters, device).
#include <ATen/core/Tensor.h>

#include "distorch/io/open.hpp"
#include "distorch/io/torch_tensor.hpp"
#include "distorch/lora/patcher.hpp"
#include "lora_test_support.hpp"

#include <doctest/doctest.h>

#include <limits>

using lora_test::bit_equal;
using lora_test::make_adapter;
using lora_test::randn;
using lora_test::relative_error;
using lora_test::scalar;

namespace {

distorch::patcher_options strict() {
  distorch::patcher_options o;
  o.strict = true;
  return o;
}

distorch::patcher_options from_source(std::shared_ptr<const distorch::weight_source> source) {
  distorch::patcher_options o;
  o.restore = distorch::restore_from::source;
  o.source = std::move(source);
  return o;
}

at::Tensor f64(const at::Tensor& t) { return t.to(at::kDouble); }

/// A small model: two linear weights (one bf16), a bias, and a tensor no adapter touches.
struct fixture {
  std::map<std::string, at::Tensor> weights{
      {"blocks.0.q.weight", randn({8, 6}, 1)},
      {"blocks.0.q.bias", randn({8}, 2)},
      {"blocks.1.k.weight", randn({8, 6}, 3).to(at::kBFloat16)},
      {"head.weight", randn({4, 8}, 4)},
  };
  std::map<std::string, at::Tensor> originals;
  at::Tensor up_q = randn({8, 2}, 5), down_q = randn({2, 6}, 6), diff_b = randn({8}, 7);
  at::Tensor up_k = randn({8, 3}, 8), down_k = randn({3, 6}, 9);
  std::shared_ptr<distorch::adapter> first, second;

  fixture() {
    for (const auto& [k, v] : weights) originals[k] = v.clone();
    first = make_adapter({{"lora_unet_blocks_0_q.lora_up.weight", up_q},
                          {"lora_unet_blocks_0_q.lora_down.weight", down_q},
                          {"lora_unet_blocks_0_q.alpha", scalar(1.0)},
                          {"lora_unet_blocks_0_q.diff_b", diff_b}},
                         "first");
    second = make_adapter({{"blocks.1.k.lora_B.weight", up_k}, {"blocks.1.k.lora_A.weight", down_k},
                           {"blocks.0.q.lora_B.weight", up_k.narrow(1, 0, 2)}, {"blocks.0.q.lora_A.weight", down_q}},
                          "second");
  }

  std::vector<distorch::bind_target> model() const {
    std::vector<distorch::bind_target> out;
    for (const auto& [k, v] : weights) out.push_back({k, v.sizes().vec(), true});
    return out;
  }

  bool unchanged(const std::string& name) const { return bit_equal(weights.at(name), originals.at(name)); }
};

}  // namespace

TEST_CASE("patch merges every targeted tensor of a unit and leaves the others bit-identical") {
  fixture f;
  distorch::patcher p(f.model(), {{f.first, 0.5}, {f.second, 2.0}}, strict());
  CHECK(p.targets("blocks.0.q.weight"));
  CHECK_FALSE(p.targets("head.weight"));
  CHECK(distorch::patch(f.weights, p, at::kCPU) == 3);
  CHECK(f.unchanged("head.weight"));
  // q: first (scale 1/2, strength 0.5) then second (scale 1, strength 2), in that order.
  const auto q = f64(f.originals["blocks.0.q.weight"]) + 0.25 * f64(f.up_q).mm(f64(f.down_q)) +
                 2.0 * f64(f.up_k.narrow(1, 0, 2)).mm(f64(f.down_q));
  CHECK(relative_error(f.weights["blocks.0.q.weight"], q) < lora_test::f32_tolerance);
  CHECK(relative_error(f.weights["blocks.0.q.bias"], f64(f.originals["blocks.0.q.bias"]) + 0.5 * f64(f.diff_b)) <
        lora_test::f32_tolerance);
  const auto k = (f.originals["blocks.1.k.weight"].to(at::kFloat) + 2.0 * f.up_k.mm(f.down_k)).to(at::kBFloat16);
  CHECK((f.weights["blocks.1.k.weight"].scalar_type() == at::kBFloat16));
  CHECK(relative_error(f.weights["blocks.1.k.weight"], f64(k)) < 1.0 / 128);
}

TEST_CASE("strength 0 leaves weights bit-identical, signed zeros included") {
  fixture f;
  f.weights["blocks.0.q.weight"][0][0] = -0.0f;
  f.weights["blocks.0.q.weight"][0][1] = std::numeric_limits<float>::denorm_min();
  f.originals["blocks.0.q.weight"] = f.weights["blocks.0.q.weight"].clone();
  distorch::patcher p(f.model(), {{f.first, 0.0}, {f.second, 0.0}});
  CHECK(distorch::patch(f.weights, p, at::kCPU) == 3);
  for (const auto& [name, t] : f.weights) {
    CAPTURE(name);
    CHECK(f.unchanged(name));
  }
  CHECK(std::signbit(f.weights["blocks.0.q.weight"][0][0].item<float>()));
}

TEST_CASE("unpatch restores the kept originals bit for bit") {
  fixture f;
  distorch::patcher p(f.model(), {{f.first, 0.9}, {f.second, 1.3}});
  const at::Tensor q_handle = f.weights["blocks.0.q.weight"];
  distorch::patch(f.weights, p, at::kCPU);
  REQUIRE_FALSE(f.unchanged("blocks.0.q.weight"));
  REQUIRE_FALSE(f.unchanged("blocks.1.k.weight"));
  CHECK(p.patched().size() == 3);
  CHECK(p.unpatch(f.weights) == 3);
  for (const auto& [name, t] : f.weights) {
    CAPTURE(name);
    CHECK(f.unchanged(name));
  }
  CHECK(f.weights["blocks.0.q.weight"].is_same(q_handle));  // in place: the caller's tensor objects stay
  CHECK(p.patched().empty());
}

TEST_CASE("unpatch restores bit for bit by reloading from the model file") {
  fixture f;
  distorch_test::temp_dir dir("lora");
  std::vector<std::pair<std::string, at::Tensor>> file(f.weights.begin(), f.weights.end());
  distorch::save_safetensors(dir / "model.safetensors", file);
  std::shared_ptr<const distorch::weight_source> source = distorch::open_weights(dir / "model.safetensors");
  distorch::patcher p(source->records(), {{f.first, 1.0}, {f.second, 1.0}},
                      from_source(source));
  distorch::patch(f.weights, p, at::kCPU);
  REQUIRE_FALSE(f.unchanged("blocks.1.k.weight"));
  CHECK(p.unpatch_all() == 3);
  for (const auto& [name, t] : f.weights) {
    CAPTURE(name);
    CHECK(f.unchanged(name));
  }
}

TEST_CASE("restoring from the source without a source is a lora_error") {
  fixture f;
  CHECK_THROWS_AS(distorch::patcher(f.model(), {{f.first, 1.0}}, from_source(nullptr)),
                  distorch::lora_error);
}

TEST_CASE("patching a patched tensor again starts from its original") {
  fixture f;
  distorch::patcher p(f.model(), {{f.first, 1.0}});
  distorch::patch(f.weights, p, at::kCPU);
  const auto once = f.weights["blocks.0.q.weight"].clone();
  distorch::patch(f.weights, p, at::kCPU);
  CHECK(bit_equal(f.weights["blocks.0.q.weight"], once));
}

TEST_CASE("set_strength re-merges exactly the tensors that adapter touches") {
  fixture f;
  distorch::patcher p(f.model(), {{f.first, 1.0}, {f.second, 1.0}});
  distorch::patch(f.weights, p, at::kCPU);
  CHECK(p.touched_by(0) == std::vector<std::string>{"blocks.0.q.bias", "blocks.0.q.weight"});
  const auto k_before = f.weights["blocks.1.k.weight"].clone();
  const auto k_storage = f.weights["blocks.1.k.weight"].data_ptr();
  CHECK(p.set_strength(0, 0.25) == 2);
  // k belongs to the second adapter only: not re-merged, not even rewritten.
  CHECK(bit_equal(f.weights["blocks.1.k.weight"], k_before));
  CHECK(f.weights["blocks.1.k.weight"].data_ptr() == k_storage);
  // q and its bias now hold the merge at the new strength, from the original.
  fixture fresh;
  distorch::patcher reference(fresh.model(), {{fresh.first, 0.25}, {fresh.second, 1.0}});
  distorch::patch(fresh.weights, reference, at::kCPU);
  CHECK(bit_equal(f.weights["blocks.0.q.weight"], fresh.weights["blocks.0.q.weight"]));
  CHECK(bit_equal(f.weights["blocks.0.q.bias"], fresh.weights["blocks.0.q.bias"]));
  CHECK(p.adapters()[0].strength == 0.25);
  // Back to 0 and unpatched: the originals, bit for bit.
  CHECK(p.set_strength(1, 0.0) == 2);
  p.unpatch_all();
  CHECK(f.unchanged("blocks.0.q.weight"));
  CHECK(f.unchanged("blocks.1.k.weight"));
}

TEST_CASE("set_strength with an index out of range is a lora_error") {
  fixture f;
  distorch::patcher p(f.model(), {{f.first, 1.0}});
  CHECK_THROWS_AS(p.set_strength(3, 1.0), distorch::lora_error);
}

TEST_CASE("strength_model scales the original weight before the adapter adds") {
  fixture f;
  distorch::patcher p(f.model(), {{f.first, 1.0, 0.5}});
  distorch::patch(f.weights, p, at::kCPU);
  const auto q = 0.5 * f64(f.originals["blocks.0.q.weight"]) + 0.5 * f64(f.up_q).mm(f64(f.down_q));
  CHECK(relative_error(f.weights["blocks.0.q.weight"], q) < lora_test::f32_tolerance);
}

TEST_CASE("the stateless patch(weights, adapters, device) merges a unit by its own names") {
  fixture f;
  std::vector<std::pair<std::string, at::Tensor>> unit{{"blocks.0.q.weight", f.weights["blocks.0.q.weight"]},
                                                       {"blocks.0.q.bias", f.weights["blocks.0.q.bias"]}};
  CHECK(distorch::patch(unit, distorch::adapter_set{{f.first, 1.0}, {f.second, 1.0}}, at::kCPU) == 2);
  fixture g;
  distorch::patcher p(g.model(), {{g.first, 1.0}, {g.second, 1.0}});
  distorch::patch(g.weights, p, at::kCPU);
  CHECK(bit_equal(f.weights["blocks.0.q.weight"], g.weights["blocks.0.q.weight"]));
  CHECK(bit_equal(f.weights["blocks.0.q.bias"], g.weights["blocks.0.q.bias"]));
}

TEST_CASE("a unit given as a vector of pairs is patched and unpatched like a map") {
  fixture f;
  distorch::patcher p(f.model(), {{f.second, 1.0}});
  std::vector<std::pair<std::string, at::Tensor>> unit{{"blocks.1.k.weight", f.weights["blocks.1.k.weight"]}};
  CHECK(p.patch(unit, at::kCPU) == 1);
  CHECK_FALSE(f.unchanged("blocks.1.k.weight"));
  CHECK(p.unpatch(unit) == 1);
  CHECK(f.unchanged("blocks.1.k.weight"));
}
