// The delta math and the merge (lora/merge.hpp): every formula against a float64 reference written
// here from the formula with plain LibTorch ops, LoRA and LoHa against files written by Debian's
// python3-torch, and the one-rounding rule for bfloat16 storage.
#include <ATen/core/Tensor.h>
#include <ATen/ops/einsum.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/kron.h>
#include <ATen/ops/zeros.h>

#include "distorch/lora/merge.hpp"
#include "lora_test_support.hpp"

#include <doctest/doctest.h>

#include <cfloat>
#include <fstream>
#include <sstream>

using lora_test::make_adapter;
using lora_test::randn;
using lora_test::relative_error;
using lora_test::scalar;

namespace {

at::Tensor f64(const at::Tensor& t) { return t.to(at::kDouble); }

/// Merges one adapter's first group into a copy of `weight`; returns the merged copy.
at::Tensor merged(const at::Tensor& weight, const std::shared_ptr<distorch::adapter>& a, double strength,
                  double strength_model = 1.0, bool bias = false, std::int64_t block_bytes = distorch::merge_block_bytes) {
  REQUIRE(a->groups().size() == 1);
  at::Tensor w = weight.clone();
  std::vector<distorch::merge_step> steps{{a.get(), &a->groups()[0], bias, strength, strength_model}};
  distorch::merge_into(w, steps, at::kCPU, block_bytes);
  return w;
}

/// DoRA exactly as ComfyUI's weight_decompose describes it, in float64: Wc = W + scale·ΔW, scaled
/// by dora_scale / (‖Wc‖ + ε) per output row or per input channel, blended by the strength.
at::Tensor dora_reference(const at::Tensor& w, const at::Tensor& delta, double scale, const at::Tensor& dora_scale,
                          double strength) {
  at::Tensor wc = w + scale * delta;
  at::Tensor norm;
  if (dora_scale.size(0) == w.size(0)) {
    norm = wc.reshape({w.size(0), -1}).pow(2).sum(1).sqrt();
    std::vector<std::int64_t> shape(static_cast<std::size_t>(w.dim()), 1);
    shape[0] = w.size(0);
    norm = norm.reshape(shape);
  } else {
    norm = wc.transpose(0, 1).reshape({w.size(1), -1}).pow(2).sum(1).sqrt();
    std::vector<std::int64_t> shape(static_cast<std::size_t>(w.dim()), 1);
    shape[1] = w.size(1);
    norm = norm.reshape(shape);
  }
  wc = wc * (f64(dora_scale).reshape(norm.sizes()) / (norm + FLT_EPSILON));
  return w + strength * (wc - w);
}

// ---- reading the python3-torch reference files ----------------------------------------------

struct reference_case {
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, double> scalars;
};

std::map<std::string, reference_case> read_references(const distorch_test::temp_dir& dir) {
  std::map<std::string, reference_case> cases;
  std::ifstream manifest(dir / "manifest.txt");
  REQUIRE(manifest.good());
  std::string line;
  while (std::getline(manifest, line)) {
    if (line.empty()) continue;
    std::istringstream in(line);
    std::string name, tensor, kind;
    in >> name >> tensor >> kind;
    if (kind == "scalar") {
      double v = 0;
      in >> v;
      cases[name].scalars[tensor] = v;
      continue;
    }
    int ndim = 0;
    in >> ndim;
    std::vector<std::int64_t> shape(static_cast<std::size_t>(ndim));
    for (auto& d : shape) in >> d;
    std::string file;
    in >> file;
    std::string bytes = distorch_test::read_file(dir / file);
    const auto type = kind == "bf16" ? at::kBFloat16 : at::kFloat;
    at::Tensor t = at::from_blob(bytes.data(), shape, at::TensorOptions().dtype(type)).clone();
    REQUIRE(static_cast<std::size_t>(t.numel() * t.element_size()) == bytes.size());
    cases[name].tensors[tensor] = t;
  }
  return cases;
}

std::map<std::string, reference_case> python_references(const distorch_test::temp_dir& dir) {
  const std::string script = distorch_test::source_root() + "/tests/lora/make_reference.py";
  const std::string command = "OMP_NUM_THREADS=1 " + distorch_test::python() + " " + script + " " + dir.path.string();
  REQUIRE_MESSAGE(std::system(command.c_str()) == 0, "python3-torch failed: " << command);
  return read_references(dir);
}

std::shared_ptr<distorch::adapter> adapter_for(const std::string& name, reference_case& c) {
  auto& t = c.tensors;
  std::map<std::string, at::Tensor> file{{"m.alpha", scalar(c.scalars.at("alpha"))}};
  if (name.find("loha") != std::string::npos) {
    file["m.hada_w1_a"] = t.at("w1a");
    file["m.hada_w1_b"] = t.at("w1b");
    file["m.hada_w2_a"] = t.at("w2a");
    file["m.hada_w2_b"] = t.at("w2b");
    if (t.count("t1")) file["m.hada_t1"] = t.at("t1"), file["m.hada_t2"] = t.at("t2");
  } else {
    file["m.lora_up.weight"] = t.at("up");
    file["m.lora_down.weight"] = t.at("down");
    if (t.count("mid")) file["m.lora_mid.weight"] = t.at("mid");
  }
  return make_adapter(file, name);
}

}  // namespace

TEST_CASE("LoRA and LoHa match python3-torch's merge (exact cases bit for bit, random cases closely)") {
  distorch_test::temp_dir dir("lora");
  auto cases = python_references(dir);
  REQUIRE(cases.size() == 7);
  for (auto& [name, c] : cases) {
    CAPTURE(name);
    auto a = adapter_for(name, c);
    const double strength = c.scalars.at("strength");
    const double strength_model = c.scalars.count("strength_model") ? c.scalars.at("strength_model") : 1.0;
    const at::Tensor result = merged(c.tensors.at("weight"), a, strength, strength_model);
    const at::Tensor& expected = c.tensors.at("expected");
    if (name.starts_with("exact_")) {
      CHECK(lora_test::bit_equal(result, expected));
    } else {
      CHECK(relative_error(result, f64(expected)) < lora_test::f32_tolerance);
    }
    if (c.tensors.count("weight_bf16")) {
      const at::Tensor rb = merged(c.tensors.at("weight_bf16"), a, strength, strength_model);
      CHECK((rb.scalar_type() == at::kBFloat16));
      const at::Tensor& eb = c.tensors.at("expected_bf16");
      if (name.starts_with("exact_")) {
        CHECK(lora_test::bit_equal(rb, eb));
      } else {
        // float32 sums in another order may land on the other side of a bfloat16 rounding
        // boundary: at most one bfloat16 step apart, and on almost no elements.
        const auto diff = (rb.to(at::kDouble) - eb.to(at::kDouble)).abs();
        const auto step = eb.to(at::kDouble).abs().clamp_min(1e-30) * (1.0 / 128);
        CHECK((diff <= step).all().item<bool>());
        CHECK(diff.gt(0).sum().item<std::int64_t>() * 100 <= eb.numel());
      }
    }
  }
}

TEST_CASE("LoRA, linear: W·strength_model + strength·(alpha/rank)·up@down") {
  const auto w = randn({48, 80}, 1), up = randn({48, 16}, 2), down = randn({16, 80}, 3);
  auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}, {"m.alpha", scalar(4.0)}});
  CHECK(a->groups()[0].scale == 0.25);
  const auto ref = f64(w) * 0.5 + (0.7 * 0.25) * f64(up).mm(f64(down));
  CHECK(relative_error(merged(w, a, 0.7, 0.5), ref) < lora_test::f32_tolerance);
}

TEST_CASE("LoRA without alpha uses scale 1 (ComfyUI)") {
  const auto w = randn({8, 12}, 4), up = randn({8, 4}, 5), down = randn({4, 12}, 6);
  auto a = make_adapter({{"m.lora_B.weight", up}, {"m.lora_A.weight", down}});
  CHECK(a->groups()[0].scale == 1.0);
  CHECK(relative_error(merged(w, a, 1.0), f64(w) + f64(up).mm(f64(down))) < lora_test::f32_tolerance);
}

TEST_CASE("LoRA, conv k×k: up [o,r,1,1] @ down [r,i,k,k] flattened, reshaped to the weight") {
  const auto w = randn({6, 4, 3, 3}, 7), up = randn({6, 2, 1, 1}, 8), down = randn({2, 4, 3, 3}, 9);
  auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}, {"m.alpha", scalar(1.0)}});
  const auto ref = f64(w) + 0.9 * 0.5 * f64(up).flatten(1).mm(f64(down).flatten(1)).reshape(w.sizes());
  CHECK(relative_error(merged(w, a, 0.9), ref) < lora_test::f32_tolerance);
}

TEST_CASE("LoRA with a Tucker mid: ΔW[o,i,h,w] = Σ up[o,r]·mid[r,s,h,w]·down[s,i]") {
  const auto w = randn({5, 7, 3, 3}, 10), up = randn({5, 4, 1, 1}, 11), mid = randn({4, 4, 3, 3}, 12),
             down = randn({4, 7, 1, 1}, 13);
  auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_mid.weight", mid}, {"m.lora_down.weight", down},
                         {"m.alpha", scalar(2.0)}});
  const auto delta = at::einsum("or,rshw,si->oihw", {f64(up).flatten(1), f64(mid), f64(down).flatten(1)});
  CHECK(relative_error(merged(w, a, 1.0), f64(w) + 0.5 * delta) < lora_test::f32_tolerance);
}

TEST_CASE("LoHa: (w1_a@w1_b) ⊙ (w2_a@w2_b), rank from w1_b") {
  const auto w = randn({20, 30}, 14), w1a = randn({20, 6}, 15), w1b = randn({6, 30}, 16), w2a = randn({20, 6}, 17),
             w2b = randn({6, 30}, 18);
  auto a = make_adapter({{"m.hada_w1_a", w1a}, {"m.hada_w1_b", w1b}, {"m.hada_w2_a", w2a}, {"m.hada_w2_b", w2b},
                         {"m.alpha", scalar(3.0)}});
  CHECK(a->groups()[0].rank == 6);
  const auto ref = f64(w) + 1.5 * 0.5 * (f64(w1a).mm(f64(w1b)) * f64(w2a).mm(f64(w2b)));
  CHECK(relative_error(merged(w, a, 1.5), ref) < lora_test::f32_tolerance);
}

TEST_CASE("LoHa with t1/t2: each factor is einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a)") {
  const auto w = randn({6, 5, 3, 3}, 19), t1 = randn({4, 4, 3, 3}, 20), t2 = randn({4, 4, 3, 3}, 21);
  const auto w1a = randn({4, 6}, 22), w1b = randn({4, 5}, 23), w2a = randn({4, 6}, 24), w2b = randn({4, 5}, 25);
  auto a = make_adapter({{"m.hada_w1_a", w1a}, {"m.hada_w1_b", w1b}, {"m.hada_w2_a", w2a}, {"m.hada_w2_b", w2b},
                         {"m.hada_t1", t1}, {"m.hada_t2", t2}, {"m.alpha", scalar(2.0)}});
  const auto m1 = at::einsum("ijkl,jr,ip->prkl", {f64(t1), f64(w1b), f64(w1a)});
  const auto m2 = at::einsum("ijkl,jr,ip->prkl", {f64(t2), f64(w2b), f64(w2a)});
  CHECK(relative_error(merged(w, a, 0.8), f64(w) + 0.8 * 0.5 * m1 * m2) < lora_test::f32_tolerance);
}

TEST_CASE("LoKr, full factors: kron(w1, w2), scale 1 whatever alpha says") {
  const auto w = randn({12, 20}, 26), w1 = randn({3, 4}, 27), w2 = randn({4, 5}, 28);
  auto a = make_adapter({{"m.lokr_w1", w1}, {"m.lokr_w2", w2}, {"m.alpha", scalar(8.0)}});
  CHECK(a->groups()[0].scale == 1.0);
  CHECK(relative_error(merged(w, a, 0.6), f64(w) + 0.6 * at::kron(f64(w1), f64(w2))) < lora_test::f32_tolerance);
}

TEST_CASE("LoKr, factored w1 and w2: the rank for alpha comes from w2_b") {
  const auto w = randn({12, 20}, 29), w1a = randn({3, 2}, 30), w1b = randn({2, 4}, 31), w2a = randn({4, 3}, 32),
             w2b = randn({3, 5}, 33);
  auto a = make_adapter({{"m.lokr_w1_a", w1a}, {"m.lokr_w1_b", w1b}, {"m.lokr_w2_a", w2a}, {"m.lokr_w2_b", w2b},
                         {"m.alpha", scalar(6.0)}});
  CHECK(a->groups()[0].rank == 3);
  const auto ref = f64(w) + 1.0 * 2.0 * at::kron(f64(w1a).mm(f64(w1b)), f64(w2a).mm(f64(w2b)));
  CHECK(relative_error(merged(w, a, 1.0), ref) < lora_test::f32_tolerance);
}

TEST_CASE("LoKr, factored w1 only: the rank comes from w1_b") {
  const auto w = randn({12, 20}, 34), w1a = randn({3, 2}, 35), w1b = randn({2, 4}, 36), w2 = randn({4, 5}, 37);
  auto a = make_adapter({{"m.lokr_w1_a", w1a}, {"m.lokr_w1_b", w1b}, {"m.lokr_w2", w2}, {"m.alpha", scalar(1.0)}});
  CHECK(a->groups()[0].rank == 2);
  const auto ref = f64(w) + 0.5 * at::kron(f64(w1a).mm(f64(w1b)), f64(w2));
  CHECK(relative_error(merged(w, a, 1.0), ref) < lora_test::f32_tolerance);
}

TEST_CASE("LoKr, conv with a Tucker t2: w1 gains unit dims to pair with the 4-D w2") {
  const auto w = randn({6, 8, 3, 3}, 38), w1 = randn({2, 2}, 39), t2 = randn({3, 3, 3, 3}, 40), w2a = randn({3, 3}, 41),
             w2b = randn({3, 4}, 42);
  auto a = make_adapter({{"m.lokr_w1", w1}, {"m.lokr_w2_a", w2a}, {"m.lokr_w2_b", w2b}, {"m.lokr_t2", t2},
                         {"m.alpha", scalar(1.5)}});
  const auto w2 = at::einsum("ijkl,jr,ip->prkl", {f64(t2), f64(w2b), f64(w2a)}).contiguous();
  const auto ref = f64(w) + 0.5 * at::kron(f64(w1).unsqueeze(2).unsqueeze(2), w2);
  CHECK(relative_error(merged(w, a, 1.0), ref) < lora_test::f32_tolerance);
}

TEST_CASE("LoKr processed in row blocks that do not align with w2's rows") {
  const auto w = randn({15, 8}, 43), w1 = randn({5, 2}, 44), w2 = randn({3, 4}, 45);
  auto a = make_adapter({{"m.lokr_w1", w1}, {"m.lokr_w2", w2}});
  // two rows of 8 floats per block: blocks straddle the 3-row groups of kron(w1, w2)
  const auto result = merged(w, a, 1.0, 1.0, false, 2 * 8 * 4);
  CHECK(relative_error(result, f64(w) + at::kron(f64(w1), f64(w2))) < lora_test::f32_tolerance);
}

TEST_CASE("DoRA on the output axis, at strength 1 and below") {
  const auto w = randn({10, 16}, 46), up = randn({10, 4}, 47), down = randn({4, 16}, 48);
  const auto ds = randn({10, 1}, 49).abs() + 0.5;
  auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}, {"m.alpha", scalar(2.0)},
                         {"m.dora_scale", ds}});
  const auto delta = f64(up).mm(f64(down));
  for (double s : {1.0, 0.6}) {
    CAPTURE(s);
    CHECK(relative_error(merged(w, a, s), dora_reference(f64(w), delta, 0.5, ds, s)) < lora_test::f32_tolerance);
  }
}

TEST_CASE("DoRA on the input axis, for a linear and a conv weight") {
  {
    const auto w = randn({10, 16}, 50), up = randn({10, 4}, 51), down = randn({4, 16}, 52);
    const auto ds = randn({1, 16}, 53).abs() + 0.5;
    auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}, {"m.dora_scale", ds}});
    const auto ref = dora_reference(f64(w), f64(up).mm(f64(down)), 1.0, ds, 0.75);
    CHECK(relative_error(merged(w, a, 0.75), ref) < lora_test::f32_tolerance);
  }
  {
    const auto w = randn({6, 4, 3, 3}, 54), up = randn({6, 2, 1, 1}, 55), down = randn({2, 4, 3, 3}, 56);
    const auto ds = randn({1, 4, 1, 1}, 57).abs() + 0.5;
    auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}, {"m.dora_scale", ds}});
    const auto delta = f64(up).flatten(1).mm(f64(down).flatten(1)).reshape(w.sizes());
    // small blocks: the norms must still cover whole columns
    const auto result = merged(w, a, 1.0, 1.0, false, 36 * 4);
    CHECK(relative_error(result, dora_reference(f64(w), delta, 1.0, ds, 1.0)) < lora_test::f32_tolerance);
  }
}

TEST_CASE("DoRA on a square weight follows dora_scale's shape, not its size") {
  // [1, 16] on a 16×16 weight is per input channel even though 16 values would fit the rows too.
  const auto w = randn({16, 16}, 58), up = randn({16, 2}, 59), down = randn({2, 16}, 60);
  const auto ds = randn({1, 16}, 61).abs() + 0.5;
  auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}, {"m.dora_scale", ds}});
  const auto ref = dora_reference(f64(w), f64(up).mm(f64(down)), 1.0, ds, 1.0);
  CHECK(relative_error(merged(w, a, 1.0), ref) < lora_test::f32_tolerance);
}

TEST_CASE("DoRA on LoKr") {
  const auto w = randn({12, 20}, 62), w1 = randn({3, 4}, 63), w2 = randn({4, 5}, 64);
  const auto ds = randn({12, 1}, 65).abs() + 0.5;
  auto a = make_adapter({{"m.lokr_w1", w1}, {"m.lokr_w2", w2}, {"m.dora_scale", ds}});
  const auto ref = dora_reference(f64(w), at::kron(f64(w1), f64(w2)), 1.0, ds, 0.9);
  CHECK(relative_error(merged(w, a, 0.9), ref) < lora_test::f32_tolerance);
}

TEST_CASE("full diff: W + strength·diff, no scale") {
  const auto w = randn({4, 6}, 66), d = randn({4, 6}, 67);
  auto a = make_adapter({{"m.diff", d}, {"m.alpha", scalar(100.0)}});
  CHECK(relative_error(merged(w, a, 0.3), f64(w) + 0.3 * f64(d)) < lora_test::f32_tolerance);
}

TEST_CASE("bias diff: the bias gains strength·diff_b") {
  const auto b = randn({6}, 68), d = randn({6}, 69);
  auto a = make_adapter({{"m.diff_b", d}});
  CHECK(relative_error(merged(b, a, 2.0, 1.0, /*bias=*/true), f64(b) + 2.0 * f64(d)) < lora_test::f32_tolerance);
}

TEST_CASE("set_weight replaces the weight; strength 0 disables it") {
  const auto w = randn({3, 5}, 70), s = randn({3, 5}, 71);
  auto a = make_adapter({{"m.set_weight", s}});
  CHECK(lora_test::bit_equal(merged(w, a, 0.5), s));
  CHECK(lora_test::bit_equal(merged(w, a, 0.0), w));
}

TEST_CASE("several adapters apply in order on one float32 copy") {
  const auto w = randn({16, 24}, 72);
  const auto up1 = randn({16, 4}, 73), down1 = randn({4, 24}, 74);
  const auto w1 = randn({4, 4}, 75), w2 = randn({4, 6}, 76);
  auto a1 = make_adapter({{"m.lora_up.weight", up1}, {"m.lora_down.weight", down1}, {"m.alpha", scalar(2.0)}});
  auto a2 = make_adapter({{"m.lokr_w1", w1}, {"m.lokr_w2", w2}});
  at::Tensor result = w.clone();
  std::vector<distorch::merge_step> steps{{a1.get(), &a1->groups()[0], false, 0.8, 0.9},
                                          {a2.get(), &a2->groups()[0], false, 0.4, 1.1}};
  distorch::merge_into(result, steps, at::kCPU);
  auto ref = f64(w) * 0.9 + 0.8 * 0.5 * f64(up1).mm(f64(down1));
  ref = ref * 1.1 + 0.4 * at::kron(f64(w1), f64(w2));
  CHECK(relative_error(result, ref) < lora_test::f32_tolerance);
}

TEST_CASE("bfloat16 weights are merged in float32 and rounded once, exactly as the reference") {
  // Two adapters each add about half a bfloat16 step: rounding after each adapter would lose or
  // double some of it, rounding once keeps their sum. Inputs are dyadic, so the float32 math is
  // exact and the float64 reference rounded once is the only right answer.
  const std::int64_t rows = 32, cols = 64;
  const auto base = (randn({rows, cols}, 77) * 64).round() / 64 + 1.0;   // values near 1..2, 6 fraction bits
  const auto w = base.to(at::kBFloat16);
  const auto up = (randn({rows, 2}, 78) * 4).round() / 4, down = (randn({2, cols}, 79) * 4).round() / 2048;
  auto a1 = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}});
  auto a2 = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}});
  at::Tensor result = w.clone();
  std::vector<distorch::merge_step> steps{{a1.get(), &a1->groups()[0], false, 1.0, 1.0},
                                          {a2.get(), &a2->groups()[0], false, 1.0, 1.0}};
  distorch::merge_into(result, steps, at::kCPU);
  const auto delta = f64(up).mm(f64(down));
  const auto exact = f64(w) + 2.0 * delta;
  REQUIRE(lora_test::bit_equal(exact.to(at::kFloat).to(at::kDouble), exact));  // float32 holds it exactly
  const auto reference = exact.to(at::kBFloat16);
  CHECK((result.scalar_type() == at::kBFloat16));
  CHECK(lora_test::bit_equal(result, reference));
  // The test can tell: rounding after each adapter gives a different tensor.
  const auto twice = (f64(w) + delta).to(at::kBFloat16).to(at::kDouble).add(delta).to(at::kBFloat16);
  CHECK_FALSE(lora_test::bit_equal(twice, reference));
}

TEST_CASE("float16 weights are rounded once as well") {
  const auto w = randn({8, 8}, 80).to(at::kHalf), up = randn({8, 2}, 81), down = randn({2, 8}, 82);
  auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}});
  const at::Tensor result = merged(w, a, 1.0);
  const auto f32 = w.to(at::kFloat).addmm(up, down);  // the float32 merge, one rounding
  CHECK(lora_test::bit_equal(result, f32.to(at::kHalf)));
}

TEST_CASE("a non-contiguous weight is merged and written back in place") {
  const auto storage = randn({12, 8}, 83);
  at::Tensor view = storage.t();  // [8, 12], not contiguous
  const auto before = view.clone();
  const auto up = randn({8, 2}, 84), down = randn({2, 12}, 85);
  auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}});
  std::vector<distorch::merge_step> steps{{a.get(), &a->groups()[0], false, 1.0, 1.0}};
  distorch::merge_into(view, steps, at::kCPU);
  CHECK(relative_error(storage.t(), f64(before) + f64(up).mm(f64(down))) < lora_test::f32_tolerance);
}

TEST_CASE("merging into a weight that is not floating point is a lora_error") {
  const auto up = randn({2, 2}, 86), down = randn({2, 2}, 87);
  auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}});
  at::Tensor w = at::zeros({2, 2}, at::TensorOptions().dtype(at::kInt));
  std::vector<distorch::merge_step> steps{{a.get(), &a->groups()[0], false, 1.0, 1.0}};
  CHECK_THROWS_AS(distorch::merge_into(w, steps, at::kCPU), distorch::lora_error);
}

TEST_CASE("merging a step whose shape does not fit is a lora_error") {
  const auto up = randn({4, 2}, 88), down = randn({2, 4}, 89);
  auto a = make_adapter({{"m.lora_up.weight", up}, {"m.lora_down.weight", down}});
  at::Tensor w = randn({4, 5}, 90);
  std::vector<distorch::merge_step> steps{{a.get(), &a->groups()[0], false, 1.0, 1.0}};
  CHECK_THROWS_AS(distorch::merge_into(w, steps, at::kCPU), distorch::lora_error);
}
