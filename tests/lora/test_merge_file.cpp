// Baking adapters into a new file (lora/merge_file.hpp, `distorch lora apply`): the merged file
// holds every tensor, merged ones equal to the in-memory merge, others byte-identical; failures
// leave no file behind.
#include <ATen/core/Tensor.h>

#include "distorch/io/open.hpp"
#include "distorch/io/torch_tensor.hpp"
#include "distorch/lora/merge_file.hpp"
#include "distorch/lora/patcher.hpp"
#include "lora_test_support.hpp"

#include <doctest/doctest.h>

#include <filesystem>

using lora_test::bit_equal;
using lora_test::make_adapter;
using lora_test::randn;
using lora_test::scalar;

namespace {
std::vector<std::pair<std::string, at::Tensor>> model_tensors() {
  return {{"diffusion_model.a.weight", randn({16, 8}, 1)},
          {"diffusion_model.a.bias", randn({16}, 2)},
          {"diffusion_model.b.weight", randn({8, 16}, 3).to(at::kBFloat16)},
          {"diffusion_model.c.weight", randn({4, 4}, 4).to(at::kHalf)}};
}
}  // namespace

TEST_CASE("merge_to_file writes every tensor, merged exactly as in memory, with the metadata") {
  distorch_test::temp_dir dir("lora");
  const auto tensors = model_tensors();
  distorch::save_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
  auto first = make_adapter({{"lora_unet_a.lora_up.weight", randn({16, 2}, 5)}, {"lora_unet_a.lora_down.weight", randn({2, 8}, 6)},
                             {"lora_unet_a.alpha", scalar(1.0)}, {"lora_unet_a.diff_b", randn({16}, 7)}},
                            "/somewhere/first.safetensors");
  auto second = make_adapter({{"lora_unet_b.hada_w1_a", randn({8, 2}, 8)}, {"lora_unet_b.hada_w1_b", randn({2, 16}, 9)},
                              {"lora_unet_b.hada_w2_a", randn({8, 2}, 10)}, {"lora_unet_b.hada_w2_b", randn({2, 16}, 11)},
                              {"lora_unet_a.lora_B.weight", randn({16, 1}, 12)}, {"lora_unet_a.lora_A.weight", randn({1, 8}, 13)}},
                             "second.safetensors");
  const distorch::adapter_set adapters{{first, 0.75}, {second, 1.5}};
  const auto model = distorch::open_weights(dir / "model.safetensors");
  const auto report = distorch::merge_to_file(*model, adapters, dir / "merged.safetensors");
  CHECK(report.tensors == 4);
  CHECK(report.patched == 3);
  CHECK(report.binding.unmatched.empty());

  // The same merge in memory, through the patcher.
  std::map<std::string, at::Tensor> expected;
  for (const auto& [k, v] : tensors) expected[k] = v.clone();
  distorch::patcher p(model->records(), adapters);
  distorch::patch(expected, p, at::kCPU);

  const auto merged = distorch::open_weights(dir / "merged.safetensors");
  REQUIRE(merged->records().size() == 4);
  for (const auto& [name, t] : expected) {
    CAPTURE(name);
    CHECK(bit_equal(merged->load(name), t));
  }
  CHECK(bit_equal(merged->load("diffusion_model.c.weight"), tensors[3].second));
  CHECK(merged->metadata().at("format") == "pt");
  CHECK(merged->metadata().at("distorch_lora") == "first.safetensors:0.75 second.safetensors:1.5");
  // Nothing but the merged file is left in the folder.
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path)) ++files;
  CHECK(files == 2);
}

TEST_CASE("a shape mismatch stops merge_to_file before it writes anything") {
  distorch_test::temp_dir dir("lora");
  distorch::save_safetensors(dir / "model.safetensors", model_tensors());
  auto bad = make_adapter({{"lora_unet_a.lora_up.weight", randn({16, 2}, 14)}, {"lora_unet_a.lora_down.weight", randn({2, 9}, 15)}});
  const auto model = distorch::open_weights(dir / "model.safetensors");
  CHECK_THROWS_AS(distorch::merge_to_file(*model, {{bad, 1.0}}, dir / "merged.safetensors"), distorch::lora_error);
  CHECK_FALSE(std::filesystem::exists(dir / "merged.safetensors"));
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path)) ++files;
  CHECK(files == 1);
}

TEST_CASE("unmatched keys stop merge_to_file in strict mode") {
  distorch_test::temp_dir dir("lora");
  distorch::save_safetensors(dir / "model.safetensors", model_tensors());
  auto other = make_adapter({{"lora_te_x.lora_up.weight", randn({2, 2}, 16)}, {"lora_te_x.lora_down.weight", randn({2, 2}, 17)}});
  const auto model = distorch::open_weights(dir / "model.safetensors");
  distorch::merge_file_options strict;
  strict.binding.strict = true;
  CHECK_THROWS_AS(distorch::merge_to_file(*model, {{other, 1.0}}, dir / "merged.safetensors", strict), distorch::lora_error);
  CHECK_FALSE(std::filesystem::exists(dir / "merged.safetensors"));
}

TEST_CASE("an output folder that does not exist is a format_error") {
  distorch_test::temp_dir dir("lora");
  distorch::save_safetensors(dir / "model.safetensors", model_tensors());
  const auto model = distorch::open_weights(dir / "model.safetensors");
  CHECK_THROWS_AS(distorch::merge_to_file(*model, {}, dir / "missing/merged.safetensors"), distorch::format_error);
}
