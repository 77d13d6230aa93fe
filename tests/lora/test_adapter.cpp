// Adapters (lora/adapter.hpp, lora/load_adapter.hpp) and binding them to a model
// (lora/binding.hpp): validation of values and factor shapes, scale rules, matched and unmatched
// keys, and shape mismatches against the model.
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include "distorch/io/torch_tensor.hpp"
#include "distorch/lora/binding.hpp"
#include "distorch/lora/load_adapter.hpp"
#include "lora_test_support.hpp"
#include "support/captured_log.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <limits>

using lora_test::make_adapter;
using lora_test::randn;
using lora_test::scalar;

namespace {

std::string lora_problem(const std::function<void()>& f) {
  try {
    f();
  } catch (const distorch::lora_error& e) {
    CHECK_FALSE(e.info().fix.empty());
    CHECK_FALSE(e.info().doing.empty());
    return e.info().subject + " | " + e.info().problem;
  }
  FAIL("expected a lora_error");
  return "";
}

std::vector<distorch::bind_target> model_of(std::vector<std::pair<std::string, std::vector<std::int64_t>>> shapes) {
  std::vector<distorch::bind_target> out;
  for (auto& [name, shape] : shapes) out.push_back({name, shape, true});
  return out;
}

distorch::binding_options strict() {
  distorch::binding_options o;
  o.strict = true;
  return o;
}

distorch::binding_options quiet() {
  distorch::binding_options o;
  o.warn_unmatched = false;
  return o;
}

using distorch_test::captured_log;

}  // namespace

// ---- adapter values and factor shapes ----------------------------------------------------------

TEST_CASE("a NaN in an adapter is a lora_error naming the key") {
  auto up = randn({4, 2}, 1);
  up[1][1] = std::numeric_limits<float>::quiet_NaN();
  const auto p = lora_problem([&] { make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", randn({2, 4}, 2)}}); });
  CHECK(p.find("m.lora_up.weight | holds a NaN or infinite value") != std::string::npos);
}

TEST_CASE("an infinity in an adapter is a lora_error naming the key") {
  auto alpha = scalar(std::numeric_limits<double>::infinity());
  const auto p = lora_problem([&] {
    make_adapter({{"m.lora_up.weight", randn({4, 2}, 3)}, {"m.lora_down.weight", randn({2, 4}, 4)}, {"m.alpha", alpha}});
  });
  CHECK(p.find("m.alpha | holds a NaN") != std::string::npos);
}

TEST_CASE("an integer adapter tensor is a lora_error") {
  const auto p = lora_problem([&] {
    make_adapter({{"m.lora_up.weight", at::zeros({4, 2}, at::TensorOptions().dtype(at::kInt))},
                  {"m.lora_down.weight", randn({2, 4}, 5)}});
  });
  CHECK(p.find("is not floating point") != std::string::npos);
}

TEST_CASE("an alpha with more than one element is a lora_error") {
  const auto p = lora_problem([&] {
    make_adapter({{"m.lora_up.weight", randn({4, 2}, 6)}, {"m.lora_down.weight", randn({2, 4}, 7)}, {"m.alpha", randn({2}, 8)}});
  });
  CHECK(p.find("alpha has 2 elements") != std::string::npos);
}

TEST_CASE("up and down of different ranks are a lora_error with both shapes") {
  const auto p = lora_problem([&] { make_adapter({{"m.lora_up.weight", randn({4, 3}, 9)}, {"m.lora_down.weight", randn({2, 4}, 10)}}); });
  CHECK(p.find("lora_up [4, 3] does not fit lora_down [2, 4]") != std::string::npos);
}

TEST_CASE("a LoRA mid that does not fit its up or down is a lora_error") {
  const auto p = lora_problem([&] {
    make_adapter({{"m.lora_up.weight", randn({4, 2, 1, 1}, 11)}, {"m.lora_mid.weight", randn({3, 2, 3, 3}, 12)},
                  {"m.lora_down.weight", randn({2, 5, 1, 1}, 13)}});
  });
  CHECK(p.find("lora_mid [3, 2, 3, 3] does not fit lora_up") != std::string::npos);
}

TEST_CASE("LoHa halves that rebuild to different shapes are a lora_error") {
  const auto p = lora_problem([&] {
    make_adapter({{"m.hada_w1_a", randn({4, 2}, 14)}, {"m.hada_w1_b", randn({2, 6}, 15)}, {"m.hada_w2_a", randn({5, 2}, 16)},
                  {"m.hada_w2_b", randn({2, 6}, 17)}});
  });
  CHECK(p.find("same shape") != std::string::npos);
}

TEST_CASE("LoKr factors that do not chain are a lora_error") {
  const auto p = lora_problem([&] {
    make_adapter({{"m.lokr_w1_a", randn({2, 3}, 18)}, {"m.lokr_w1_b", randn({2, 3}, 19)}, {"m.lokr_w2", randn({2, 2}, 20)}});
  });
  CHECK(p.find("lokr_w1_a [2, 3] does not fit lokr_w1_b [2, 3]") != std::string::npos);
}

TEST_CASE("a factor with the wrong number of dimensions is a lora_error") {
  const auto p = lora_problem([&] { make_adapter({{"m.lora_up.weight", randn({4}, 21)}, {"m.lora_down.weight", randn({1, 4}, 22)}}); });
  CHECK(p.find("1 dimensions where 2 to 5 are expected") != std::string::npos);
}

TEST_CASE("dora_scale on a full diff is left unrecognized, so binding reports it") {
  auto a = make_adapter({{"m.diff", randn({2, 2}, 23)}, {"m.dora_scale", randn({2, 1}, 24)}});
  REQUIRE(a->groups().size() == 1);
  CHECK_FALSE(a->groups()[0].keys.dora());
  CHECK(a->unrecognized() == std::vector<std::string>{"m.dora_scale"});
}

// ---- scale rules ---------------------------------------------------------------------------------

TEST_CASE("scale is alpha / rank, rank being down's leading dimension; no alpha means 1") {
  auto a = make_adapter({{"a.lora_up.weight", randn({8, 4}, 25)}, {"a.lora_down.weight", randn({4, 8}, 26)}, {"a.alpha", scalar(2.0)},
                         {"b.lora_up.weight", randn({8, 4}, 27)}, {"b.lora_down.weight", randn({4, 8}, 28)}});
  REQUIRE(a->groups().size() == 2);
  CHECK(a->groups()[0].rank == 4);
  CHECK(a->groups()[0].alpha == 2.0);
  CHECK(a->groups()[0].scale == 0.5);
  CHECK_FALSE(a->groups()[1].alpha.has_value());
  CHECK(a->groups()[1].scale == 1.0);
}

TEST_CASE("a PEFT config gives lora_alpha to groups without their own alpha; use_rslora divides by √rank") {
  std::map<std::string, at::Tensor> t{{"base_model.model.q.lora_B.weight", randn({8, 4}, 29)},
                                      {"base_model.model.q.lora_A.weight", randn({4, 8}, 30)},
                                      {"base_model.model.k.lora_B.weight", randn({8, 4}, 31)},
                                      {"base_model.model.k.lora_A.weight", randn({4, 8}, 32)},
                                      {"base_model.model.k.alpha", scalar(1.0)}};
  auto plain = distorch::adapter::from_tensors("peft", t, distorch::parse_peft_config(R"({"r":4,"lora_alpha":16})", "cfg"));
  CHECK(plain.groups()[0].scale == 0.25);  // k: its own alpha wins
  CHECK(plain.groups()[1].scale == 4.0);   // q: 16 / 4
  auto rs = distorch::adapter::from_tensors("peft", t,
                                            distorch::parse_peft_config(R"({"r":4,"lora_alpha":16,"use_rslora":true})", "cfg"));
  CHECK(rs.groups()[1].scale == 8.0);   // 16 / √4
  CHECK(rs.groups()[0].scale == 0.5);   // 1 / √4
  auto pattern = distorch::adapter::from_tensors(
      "peft", t, distorch::parse_peft_config(R"({"lora_alpha":16,"alpha_pattern":{"q":2}})", "cfg"));
  CHECK(pattern.groups()[1].scale == 0.5);  // 2 / 4
}

TEST_CASE("the PEFT config does not change LoHa scales") {
  auto a = distorch::adapter::from_tensors(
      "x",
      {{"m.hada_w1_a", randn({4, 2}, 33)}, {"m.hada_w1_b", randn({2, 6}, 34)}, {"m.hada_w2_a", randn({4, 2}, 35)},
       {"m.hada_w2_b", randn({2, 6}, 36)}},
      distorch::parse_peft_config(R"({"lora_alpha":16})", "cfg"));
  CHECK(a.groups()[0].scale == 1.0);
}

// ---- loading from files --------------------------------------------------------------------------

TEST_CASE("load_adapter reads a safetensors file and the adapter_config.json beside it") {
  distorch_test::temp_dir dir("lora");
  const auto up = randn({6, 2}, 37), down = randn({2, 3}, 38);
  distorch::save_safetensors(dir / "adapter_model.safetensors",
                             {{"base_model.model.proj.lora_B.weight", up}, {"base_model.model.proj.lora_A.weight", down}});
  auto bare = distorch::load_adapter(dir / "adapter_model.safetensors");
  REQUIRE(bare.groups().size() == 1);
  CHECK(bare.groups()[0].scale == 1.0);
  CHECK(lora_test::bit_equal(bare.tensor("base_model.model.proj.lora_B.weight"), up));
  {
    std::ofstream cfg(dir / "adapter_config.json");
    cfg << R"({"peft_type": "LORA", "r": 2, "lora_alpha": 8})";
  }
  auto with_cfg = distorch::load_adapter(dir / "adapter_model.safetensors");
  CHECK(with_cfg.groups()[0].scale == 4.0);
  distorch::adapter_load_options no_config;
  no_config.peft_config_beside = false;
  auto ignored = distorch::load_adapter(dir / "adapter_model.safetensors", no_config);
  CHECK(ignored.groups()[0].scale == 1.0);
}

TEST_CASE("a broken adapter_config.json beside the file is a lora_error, not a silent scale of 1") {
  distorch_test::temp_dir dir("lora");
  distorch::save_safetensors(dir / "a.safetensors", {{"m.lora_B.weight", randn({2, 2}, 39)}, {"m.lora_A.weight", randn({2, 2}, 40)}});
  {
    std::ofstream cfg(dir / "adapter_config.json");
    cfg << "{\"lora_alpha\": ";
  }
  CHECK_THROWS_AS(distorch::load_adapter(dir / "a.safetensors"), distorch::lora_error);
}

TEST_CASE("a file with no adapter keys (a model file) is a lora_error naming the file, not an empty adapter") {
  distorch_test::temp_dir dir("lora");
  const std::string model = dir / "model.safetensors";
  distorch::save_safetensors(model, {{"blocks.0.attn.weight", randn({4, 4}, 41)}, {"head.weight", randn({2, 4}, 42)}});
  CHECK_THROWS_WITH_AS(distorch::load_adapter(model), doctest::Contains((model + "': the file holds no adapter keys").c_str()),
                       distorch::lora_error);
  // Keys with an adapter suffix that form no group (a lone up factor) hold no adapter either.
  distorch::save_safetensors(dir / "half.safetensors", {{"m.lora_up.weight", randn({4, 2}, 43)}});
  CHECK_THROWS_AS(distorch::load_adapter(dir / "half.safetensors"), distorch::lora_error);
}

TEST_CASE("a missing adapter file is a format_error") {
  distorch_test::temp_dir dir("lora");
  CHECK_THROWS_AS(distorch::load_adapter(dir / "missing.safetensors"), distorch::format_error);
}

// ---- binding -----------------------------------------------------------------------------------

TEST_CASE("binding resolves kohya, diffusers and PEFT keys to the model's tensors") {
  auto a = make_adapter({{"lora_unet_blocks_0_attn_qkv.lora_up.weight", randn({12, 2}, 41)},
                         {"lora_unet_blocks_0_attn_qkv.lora_down.weight", randn({2, 4}, 42)},
                         {"unet.blocks.0.proj.lora.up.weight", randn({4, 2}, 43)},
                         {"unet.blocks.0.proj.lora.down.weight", randn({2, 4}, 44)},
                         {"base_model.model.head.lora_B.weight", randn({3, 1}, 45)},
                         {"base_model.model.head.lora_A.weight", randn({1, 4}, 46)}});
  const auto model = model_of({{"diffusion_model.blocks.0.attn.qkv.weight", {12, 4}},
                               {"diffusion_model.blocks.0.proj.weight", {4, 4}},
                               {"diffusion_model.head.weight", {3, 4}}});
  const auto b = distorch::adapter_binding::bind(model, {{a}}, strict());
  CHECK(b.report().unmatched.empty());
  REQUIRE(b.report().matched.size() == 3);
  for (const auto& name : {"diffusion_model.blocks.0.attn.qkv.weight", "diffusion_model.blocks.0.proj.weight",
                           "diffusion_model.head.weight"}) {
    CAPTURE(name);
    REQUIRE(b.patches_for(name) != nullptr);
    CHECK(b.patches_for(name)->size() == 1);
  }
  CHECK(b.touched_by(0).size() == 3);
}

TEST_CASE("a shape mismatch is a lora_error naming the key, the adapter shape and the weight shape") {
  auto a = make_adapter({{"lora_unet_proj.lora_up.weight", randn({8, 2}, 47)}, {"lora_unet_proj.lora_down.weight", randn({2, 4}, 48)}});
  const auto model = model_of({{"diffusion_model.proj.weight", {8, 5}}});
  const auto p = lora_problem([&] { (void)distorch::adapter_binding::bind(model, {{a}}); });
  CHECK(p.find("lora_unet_proj.lora_up.weight") != std::string::npos);
  CHECK(p.find("adapter shape [8, 4]") != std::string::npos);
  CHECK(p.find("'diffusion_model.proj.weight' of shape [8, 5]") != std::string::npos);
}

TEST_CASE("a full diff must have exactly the weight's shape") {
  auto a = make_adapter({{"proj.diff", randn({4, 2}, 49)}});
  const auto model = model_of({{"proj.weight", {2, 4}}});
  const auto p = lora_problem([&] { (void)distorch::adapter_binding::bind(model, {{a}}); });
  CHECK(p.find("adapter shape [4, 2] does not fit weight 'proj.weight' of shape [2, 4]") != std::string::npos);
}

TEST_CASE("a bias diff of the wrong shape is a lora_error naming the bias") {
  auto a = make_adapter({{"proj.diff_b", randn({3}, 50)}});
  const auto model = model_of({{"proj.weight", {2, 4}}, {"proj.bias", {2}}});
  const auto p = lora_problem([&] { (void)distorch::adapter_binding::bind(model, {{a}}); });
  CHECK(p.find("bias 'proj.bias' of shape [2]") != std::string::npos);
}

TEST_CASE("a bias diff for a module without a bias is unmatched") {
  auto a = make_adapter({{"proj.diff_b", randn({2}, 51)}});
  const auto b = distorch::adapter_binding::bind(model_of({{"proj.weight", {2, 4}}}), {{a}}, quiet());
  REQUIRE(b.report().unmatched.size() == 1);
  CHECK(b.report().unmatched[0].key == "proj.diff_b");
}

TEST_CASE("a dora_scale that fits neither axis is a lora_error") {
  auto a = make_adapter({{"proj.lora_up.weight", randn({4, 2}, 52)}, {"proj.lora_down.weight", randn({2, 6}, 53)},
                         {"proj.dora_scale", randn({5}, 54)}});
  const auto p = lora_problem([&] { (void)distorch::adapter_binding::bind(model_of({{"proj.weight", {4, 6}}}), {{a}}); });
  CHECK(p.find("dora_scale shape [5] fits neither") != std::string::npos);
}

TEST_CASE("a group that targets a quantized (non-floating) tensor is a lora_error") {
  auto a = make_adapter({{"proj.lora_up.weight", randn({4, 2}, 55)}, {"proj.lora_down.weight", randn({2, 6}, 56)}});
  std::vector<distorch::bind_target> model{{"proj.weight", {4, 6}, false}};
  const auto p = lora_problem([&] { (void)distorch::adapter_binding::bind(model, {{a}}); });
  CHECK(p.find("not floating point") != std::string::npos);
}

TEST_CASE("two groups of one adapter patching one tensor is a lora_error") {
  auto a = make_adapter({{"lora_unet_proj.lora_up.weight", randn({4, 2}, 57)}, {"lora_unet_proj.lora_down.weight", randn({2, 6}, 58)},
                         {"unet.proj.lora_B.weight", randn({4, 2}, 59)}, {"unet.proj.lora_A.weight", randn({2, 6}, 60)}});
  const auto p = lora_problem([&] { (void)distorch::adapter_binding::bind(model_of({{"proj.weight", {4, 6}}}), {{a}}); });
  CHECK(p.find("of the same adapter already patches") != std::string::npos);
}

TEST_CASE("unmatched keys: a warning listing them, or a lora_error in strict mode") {
  auto a = make_adapter({{"proj.lora_up.weight", randn({4, 2}, 61)}, {"proj.lora_down.weight", randn({2, 6}, 62)},
                         {"lora_te_nothing.lora_up.weight", randn({4, 2}, 63)},
                         {"lora_te_nothing.lora_down.weight", randn({2, 6}, 64)}, {"stray.key", randn({1}, 65)}});
  const auto model = model_of({{"proj.weight", {4, 6}}});
  {
    captured_log log;
    const auto b = distorch::adapter_binding::bind(model, {{a}});
    CHECK(b.report().matched.size() == 1);
    CHECK(b.report().unmatched.size() == 3);
    REQUIRE(log.warnings.size() == 1);
    CHECK(log.warnings[0].find("3 adapter keys match no model tensor") != std::string::npos);
    for (const auto& key : {"lora_te_nothing.lora_up.weight", "lora_te_nothing.lora_down.weight", "stray.key"})
      CHECK(log.warnings[0].find(key) != std::string::npos);
  }
  const auto p = lora_problem([&] { (void)distorch::adapter_binding::bind(model, {{a}}, strict()); });
  CHECK(p.find("stray.key") != std::string::npos);
  CHECK(p.find("3 adapter keys match no model tensor") != std::string::npos);
}

TEST_CASE("user prefix rules reach names no built-in rule knows") {
  auto a = make_adapter({{"custom__proj.lora_up.weight", randn({4, 2}, 66)}, {"custom__proj.lora_down.weight", randn({2, 6}, 67)}});
  const auto model = model_of({{"net.proj.weight", {4, 6}}});
  CHECK_THROWS_AS(distorch::adapter_binding::bind(model, {{a}}, strict()), distorch::lora_error);
  auto with_rule = strict();
  with_rule.prefix_rules = {{"net.", "custom__", true}};
  const auto b = distorch::adapter_binding::bind(model, {{a}}, with_rule);
  CHECK(b.patches_for("net.proj.weight") != nullptr);
  CHECK(b.report().matched[0].convention == distorch::key_convention::user);
}

TEST_CASE("binding from tensor records uses their shapes and dtypes") {
  auto a = make_adapter({{"proj.lora_up.weight", randn({4, 2}, 68)}, {"proj.lora_down.weight", randn({2, 6}, 69)}});
  std::vector<distorch::tensor_record> ok{{"proj.weight", distorch::dtype::bf16, {4, 6}}};
  CHECK(distorch::adapter_binding::bind(ok, {{a}}).patches_for("proj.weight") != nullptr);
  std::vector<distorch::tensor_record> quantized{{"proj.weight", distorch::dtype::i8, {4, 6}}};
  CHECK_THROWS_AS(distorch::adapter_binding::bind(quantized, {{a}}), distorch::lora_error);
}

namespace {

// Writes one adapter twice: as a PyTorch .bin (torch.save of a state dict, the format older PEFT
// and kohya trainers leave behind) and as safetensors with the safetensors package's own
// save_file. Kohya keys with 0-d alphas and float16 factors, PEFT keys in float32, bfloat16
// factors, and one factor saved as a view at a nonzero storage offset.
constexpr const char* bin_adapter_script = R"PY(
import sys, torch
from safetensors.torch import save_file
out = sys.argv[1]
g = torch.Generator().manual_seed(1234)
def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)
wide = randn(10, 3)
sd = {
    "lora_unet_down_blocks_0_proj.lora_up.weight": randn(6, 4, dtype=torch.float16),
    "lora_unet_down_blocks_0_proj.lora_down.weight": randn(4, 5, dtype=torch.float16),
    "lora_unet_down_blocks_0_proj.alpha": torch.tensor(2.0),
    "base_model.model.blocks.1.attn.lora_B.weight": randn(8, 3),
    "base_model.model.blocks.1.attn.lora_A.weight": wide[4:7],  # a view: storage offset 12
    "base_model.model.blocks.1.mlp.lora_B.weight": randn(7, 2, dtype=torch.bfloat16),
    "base_model.model.blocks.1.mlp.lora_A.weight": randn(2, 9, dtype=torch.bfloat16),
}
torch.save(sd, out + "/adapter_model.bin")
save_file(sd, out + "/adapter_model.safetensors", metadata={"format": "pt"})
)PY";

}  // namespace

TEST_CASE("load_adapter reads a PyTorch .bin adapter: the same adapter as its safetensors copy") {
  distorch_test::temp_dir dir("lora-bin");
  const int rc = distorch_test::run_python(dir, "write_adapter.py", bin_adapter_script, dir.path.string());
  REQUIRE_MESSAGE(rc == 0, distorch_test::read_file(dir / "write_adapter.py.log"));

  const auto from_bin = distorch::load_adapter(dir / "adapter_model.bin");
  const auto from_safetensors = distorch::load_adapter(dir / "adapter_model.safetensors");
  REQUIRE(from_safetensors.tensors().size() == 7);
  REQUIRE(from_bin.tensors().size() == from_safetensors.tensors().size());
  for (const auto& [name, t] : from_safetensors.tensors()) {
    INFO("tensor ", name);
    REQUIRE(from_bin.tensors().count(name) == 1);
    CHECK(lora_test::bit_equal(from_bin.tensor(name), t));
  }
  REQUIRE(from_safetensors.groups().size() == 3);
  REQUIRE(from_bin.groups().size() == from_safetensors.groups().size());
  for (std::size_t i = 0; i < from_bin.groups().size(); ++i) {
    const auto& b = from_bin.groups()[i];
    const auto& s = from_safetensors.groups()[i];
    INFO("group ", s.keys.base);
    CHECK(b.keys.base == s.keys.base);
    CHECK((b.keys.kind == s.keys.kind));
    CHECK(b.rows == s.rows);
    CHECK(b.cols == s.cols);
    CHECK(b.rank == s.rank);
    CHECK(b.alpha == s.alpha);
    CHECK(b.scale == s.scale);
  }
  CHECK(from_bin.unrecognized() == from_safetensors.unrecognized());
  // The kohya group's scale is alpha / rank = 2 / 4, read from the 0-d alpha of each file.
  bool saw_kohya = false;
  for (const auto& g : from_bin.groups())
    if (g.keys.base.find("lora_unet") != std::string::npos) {
      saw_kohya = true;
      CHECK(g.scale == 0.5);
    }
  CHECK(saw_kohya);
}
