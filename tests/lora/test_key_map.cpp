// The forward key map (lora/key_map.hpp): tables of adapter keys per convention, precedence, user
// rules and rejected rules.
#include "distorch/lora/key_map.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using distorch::key_convention;

namespace {
struct expectation {
  const char* adapter_key;
  const char* tensor;
  key_convention convention;
};

void check_table(const std::vector<std::string>& model, const std::vector<expectation>& table) {
  const auto map = distorch::key_map::build(model);
  for (const auto& row : table) {
    CAPTURE(row.adapter_key);
    const auto t = map.find(row.adapter_key);
    REQUIRE(t.has_value());
    CHECK(t->tensor == row.tensor);
    CHECK(t->convention == row.convention);
  }
}
}  // namespace

TEST_CASE("kohya keys: lora_unet_ / lora_te_ / lora_te1_ / lora_te2_ with dots flattened") {
  const std::vector<std::string> model{
      "diffusion_model.input_blocks.1.1.proj_in.weight",
      "diffusion_model.input_blocks.1.1.proj_in.bias",
      "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
      "clip_g.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
      "text_encoder.text_model.encoder.layers.2.mlp.fc2.weight",
      "text_encoder_2.text_model.encoder.layers.5.self_attn.out_proj.weight",
  };
  check_table(model, {
      {"lora_unet_input_blocks_1_1_proj_in", "diffusion_model.input_blocks.1.1.proj_in.weight", key_convention::kohya},
      {"lora_te_text_model_encoder_layers_0_self_attn_q_proj",
       "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", key_convention::kohya},
      {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
       "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", key_convention::kohya},
      {"lora_te2_text_model_encoder_layers_3_mlp_fc1", "clip_g.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
       key_convention::kohya},
      {"lora_te_text_model_encoder_layers_2_mlp_fc2", "text_encoder.text_model.encoder.layers.2.mlp.fc2.weight",
       key_convention::kohya},
      {"lora_te2_text_model_encoder_layers_5_self_attn_out_proj",
       "text_encoder_2.text_model.encoder.layers.5.self_attn.out_proj.weight", key_convention::kohya},
  });
}

TEST_CASE("kohya keys for a bare model whose names carry no prefix") {
  check_table({"double_blocks.0.img_attn.qkv.weight"},
              {{"lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight", key_convention::kohya},
               {"lora_transformer_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight", key_convention::kohya}});
}

TEST_CASE("diffusers keys: unet. / transformer. / text_encoder. / text_encoder_2.") {
  const std::vector<std::string> model{
      "diffusion_model.transformer_blocks.0.attn.to_q.weight",
      "clip_l.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
      "clip_g.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight",
  };
  check_table(model, {
      {"unet.transformer_blocks.0.attn.to_q", "diffusion_model.transformer_blocks.0.attn.to_q.weight", key_convention::diffusers},
      {"transformer.transformer_blocks.0.attn.to_q", "diffusion_model.transformer_blocks.0.attn.to_q.weight",
       key_convention::diffusers},
      {"text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
       "clip_l.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight", key_convention::diffusers},
      {"text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj",
       "clip_g.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight", key_convention::diffusers},
  });
}

TEST_CASE("PEFT keys: base_model.model. in front of the module path") {
  check_table({"model.layers.0.self_attn.q_proj.weight", "diffusion_model.blocks.2.ff.net.0.proj.weight"},
              {{"base_model.model.model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight", key_convention::peft},
               {"base_model.model.blocks.2.ff.net.0.proj", "diffusion_model.blocks.2.ff.net.0.proj.weight", key_convention::peft},
               {"unet.base_model.model.blocks.2.ff.net.0.proj", "diffusion_model.blocks.2.ff.net.0.proj.weight",
                key_convention::peft}});
}

TEST_CASE("generic keys: the module path itself, with or without diffusion_model.") {
  check_table({"diffusion_model.blocks.0.attn.qkv.weight", "diffusion_model.pos_embed", "blocks.9.norm.weight"},
              {{"diffusion_model.blocks.0.attn.qkv", "diffusion_model.blocks.0.attn.qkv.weight", key_convention::generic},
               {"blocks.0.attn.qkv", "diffusion_model.blocks.0.attn.qkv.weight", key_convention::generic},
               {"diffusion_model.pos_embed", "diffusion_model.pos_embed", key_convention::generic},
               {"diffusion_model.blocks.9.norm", "blocks.9.norm.weight", key_convention::generic}});
}

TEST_CASE("keys the model does not generate are not found") {
  const auto map = distorch::key_map::build(std::vector<std::string>{"diffusion_model.out.0.weight"});
  CHECK_FALSE(map.find("lora_unet_out_1").has_value());
  CHECK_FALSE(map.find("lora_unet_").has_value());
  CHECK_FALSE(map.find("").has_value());
  // A flattened prefix followed by dots was not generated by the flattening rules.
  CHECK_FALSE(map.find("lora_unet_out.0").has_value());
  CHECK_FALSE(map.find("text_encoder.out.0").has_value());
}

TEST_CASE("user prefix rules map custom names and win over built-in rules") {
  const std::vector<std::string> model{"net.block.0.proj.weight", "block.0.proj.weight"};
  std::vector<distorch::prefix_rule> user{{"net.", "my_lora_", true}, {"net.", "", false}};
  const auto map = distorch::key_map::build(model, user);
  auto t = map.find("my_lora_block_0_proj");
  REQUIRE(t.has_value());
  CHECK(t->tensor == "net.block.0.proj.weight");
  CHECK(t->convention == key_convention::user);
  // Without the user rule "block.0.proj" is the second tensor's own path; the user rule claims it first.
  t = map.find("block.0.proj");
  REQUIRE(t.has_value());
  CHECK(t->tensor == "net.block.0.proj.weight");
  const auto plain = distorch::key_map::build(model);
  CHECK(plain.find("block.0.proj")->tensor == "block.0.proj.weight");
}

TEST_CASE("a user rule that maps nothing new is a lora_error") {
  std::vector<distorch::prefix_rule> user{{"", "", false}};
  CHECK_THROWS_AS(distorch::key_map::build(std::vector<std::string>{"a.weight"}, user), distorch::lora_error);
}

TEST_CASE("bias_of finds the bias that belongs to a weight") {
  const auto map = distorch::key_map::build(std::vector<std::string>{"a.weight", "a.bias", "b.weight"});
  CHECK(map.bias_of("a.weight") == "a.bias");
  CHECK_FALSE(map.bias_of("b.weight").has_value());
  CHECK_FALSE(map.bias_of("a.bias").has_value());
  CHECK(map.has_tensor("b.weight"));
}

TEST_CASE("the map builds from tensor records too") {
  std::vector<distorch::tensor_record> records{{"diffusion_model.x.weight", distorch::dtype::f16, {4, 4}}};
  const auto map = distorch::key_map::build(records);
  CHECK(map.find("lora_unet_x")->tensor == "diffusion_model.x.weight");
}
