#pragma once
/// \file
/// `adapter`: one adapter file held in memory (its tensors, its key groups with their kind, rank,
/// alpha and scale), validated once when it is made, and `adapter_use` / `adapter_set`: adapters
/// with the strengths they are applied at, in order.
///
/// Validation at construction means a bad adapter fails before any weight is touched: every tensor
/// must be floating point and finite, and the factors of every group must fit each other (up's rank
/// = down's rank, ...). Whether they fit the *model* is checked when they are bound to it
/// (lora/binding.hpp).
///
/// Scale (ComfyUI semantics): alpha / rank, where rank is the leading dimension of `lora_down`,
/// `hada_w1_b`, or for LoKr `lokr_w2_b` (else `lokr_w1_b`); no alpha means 1.0. When a PEFT
/// `adapter_config.json` is given (or sits beside the file), its `lora_alpha` (or `alpha_pattern`)
/// is the alpha of LoRA groups that carry no `.alpha` tensor, and `use_rslora` makes the scale
/// alpha / √rank.
///
/// Example:
/// \code
///   std::map<std::string, at::Tensor> t{{"m.lora_up.weight", up}, {"m.lora_down.weight", down},
///                                       {"m.alpha", at::scalar_tensor(8.0)}};
///   auto a = std::make_shared<distorch::adapter>(distorch::adapter::from_tensors("style", t));
///   a->groups()[0].scale;                      // 8 / rank
///   distorch::adapter_set set{{a, 0.8}};       // strength 0.8
/// \endcode

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/io/weight_source.hpp"
#include "distorch/lora/adapter_keys.hpp"
#include "distorch/lora/peft_config.hpp"

namespace distorch::inline v0 {

/// One key group of an adapter with what the merge needs to know about it.
struct adapter_group {
  key_group keys;
  std::int64_t rows = 0;               ///< rows of ΔW (the target's dim 0)
  std::int64_t cols = 0;               ///< elements per row of ΔW
  std::vector<std::int64_t> shape;     ///< for diff / set: the exact shape the target must have
  std::vector<std::int64_t> bias_shape;///< for `.diff_b`: the exact shape of the bias
  std::int64_t rank = 0;               ///< 0 when the kind has none (diff, set, unfactored LoKr)
  std::optional<double> alpha;         ///< from `.alpha`, else the PEFT config
  double scale = 1.0;                  ///< what ΔW is multiplied by before the strength
};

namespace detail {

inline std::string shape_string(at::IntArrayRef s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}
inline std::string shape_string(const std::vector<std::int64_t>& s) { return shape_string(at::IntArrayRef(s)); }

[[noreturn]] inline void adapter_fail(const std::string& adapter_name, const std::string& key, std::string problem,
                                      std::string fix) {
  throw lora_error({"loading adapter " + adapter_name, key, std::nullopt, std::move(problem), std::move(fix)});
}

inline std::int64_t trailing_numel(at::IntArrayRef s, std::size_t from) {
  std::int64_t n = 1;
  for (std::size_t i = from; i < s.size(); ++i) n *= s[i];
  return n;
}

inline std::int64_t numel_of(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

/// ComfyUI's rule: DoRA magnitudes are per output row when dora_scale's first dimension is the
/// weight's; otherwise they are per input channel.
inline bool dora_on_output_axis(const at::Tensor& dora_scale, std::int64_t rows) {
  return dora_scale.dim() >= 1 && dora_scale.size(0) == rows && dora_scale.numel() == rows;
}

}  // namespace detail

/// One adapter file in memory. Immutable once made; share it through `std::shared_ptr`.
class adapter {
 public:
  /// Makes an adapter from named tensors (CPU or any device; kept as given, converted to float32
  /// on the compute device at merge time). `peft` supplies PEFT's alpha rules.
  ///
  /// Throws `lora_error` naming the key for a non-floating or non-finite tensor, an `.alpha` that is
  /// not one element, and factors whose shapes do not fit each other.
  /// \code
  ///   auto a = distorch::adapter::from_tensors("detail", tensors);
  /// \endcode
  static adapter from_tensors(std::string name, std::map<std::string, at::Tensor> tensors,
                              std::optional<peft_config> peft = std::nullopt) {
    adapter a;
    a.name_ = std::move(name);
    a.tensors_ = std::move(tensors);
    a.peft_ = std::move(peft);
    a.validate_values();
    std::vector<std::string> names;
    names.reserve(a.tensors_.size());
    for (const auto& [k, v] : a.tensors_) names.push_back(k);
    auto grouping = group_adapter_keys(names);
    a.unrecognized_ = std::move(grouping.unrecognized);
    for (auto& g : grouping.groups) a.groups_.push_back(a.describe(std::move(g)));
    return a;
  }

  /// Loads every tensor of an open weight file as an adapter. `peft`: see `from_tensors`.
  ///
  /// Throws `lora_error` naming the file, before reading any tensor data, when no key of the file
  /// forms an adapter group: a model's own weights given as an adapter would otherwise load as
  /// an adapter that patches nothing.
  /// \code
  ///   auto src = distorch::open_weights("style.safetensors");
  ///   auto a = distorch::adapter::from_source(*src);
  /// \endcode
  static adapter from_source(const weight_source& source, std::optional<peft_config> peft = std::nullopt) {
    require_adapter_keys(source);
    std::map<std::string, at::Tensor> tensors;
    for (const auto& r : source.records()) tensors.emplace(r.name, source.load(r.name));
    return from_tensors(source.path(), std::move(tensors), std::move(peft));
  }

  /// The PEFT config beside an adapter file (`adapter_config.json` in the same folder), if there is
  /// one. Throws `lora_error` when it exists but cannot be read or parsed.
  /// \code auto cfg = distorch::adapter::peft_config_beside("lora/adapter_model.safetensors"); \endcode
  static std::optional<peft_config> peft_config_beside(const std::string& adapter_path) {
    const auto dir = std::filesystem::path(adapter_path).parent_path();
    const auto cfg_path = (dir.empty() ? std::filesystem::path(".") : dir) / "adapter_config.json";
    std::error_code ec;
    if (!std::filesystem::is_regular_file(cfg_path, ec)) return std::nullopt;
    std::ifstream in(cfg_path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    if (!in && !in.eof())
      throw lora_error({"reading PEFT config", cfg_path.string(), std::nullopt, "the file cannot be read",
                        "check its permissions or remove it"});
    return parse_peft_config(text.str(), cfg_path.string());
  }

  /// The name given at construction (the file path for loaded adapters).
  const std::string& name() const noexcept { return name_; }
  /// Key groups, sorted by base.
  const std::vector<adapter_group>& groups() const noexcept { return groups_; }
  /// Keys that belong to no usable group (reported as unmatched when binding).
  const std::vector<std::string>& unrecognized() const noexcept { return unrecognized_; }
  /// The PEFT config in force, if any.
  const std::optional<peft_config>& peft() const noexcept { return peft_; }
  /// All tensors by name.
  const std::map<std::string, at::Tensor>& tensors() const noexcept { return tensors_; }
  /// One tensor by name. Throws `lora_error` when the adapter has no such tensor.
  const at::Tensor& tensor(const std::string& key) const {
    auto it = tensors_.find(key);
    if (it == tensors_.end())
      detail::adapter_fail(name_, key, "the adapter has no such tensor", "use a name from tensors()");
    return it->second;
  }
  /// The tensor of a group's role (which must be present).
  const at::Tensor& tensor(const adapter_group& g, component c) const { return tensor(g.keys.name(c)); }

 private:
  static void require_adapter_keys(const weight_source& source) {
    std::vector<std::string> names;
    names.reserve(source.records().size());
    for (const auto& r : source.records()) names.push_back(r.name);
    if (!group_adapter_keys(names).groups.empty()) return;
    const std::string held = names.empty() ? "it has no tensors"
                                           : "none of its " + std::to_string(names.size()) + " tensors ('" + names.front() +
                                                 "', ...) is named like a LoRA, LoHa, LoKr or diff patch";
    throw lora_error({"loading adapter", source.path(), std::nullopt, "the file holds no adapter keys: " + held,
                      "pass an adapter file, whose keys end in '.lora_up.weight', '.lora_A.weight', '.hada_w1_a', "
                      "'.lokr_w1', '.diff'...; a model's own weights are not an adapter"});
  }

  void validate_values() const {
    for (const auto& [key, t] : tensors_) {
      if (!t.defined()) detail::adapter_fail(name_, key, "tensor is undefined", "pass a real tensor");
      if (!t.is_floating_point())
        detail::adapter_fail(name_, key, std::string("dtype ") + c10::toString(t.scalar_type()) + " is not floating point",
                             "store adapter tensors as float32, float16 or bfloat16");
      if (t.numel() > 0 && !t.isfinite().all().item<bool>())
        detail::adapter_fail(name_, key, "holds a NaN or infinite value", "retrain or re-export the adapter");
    }
  }

  std::int64_t dim_of(const adapter_group& g, component c, std::int64_t d) const { return tensor(g, c).size(d); }

  void need_dims(const key_group& g, component c, std::int64_t low, std::int64_t high) const {
    const auto& t = tensor(g.name(c));
    if (t.dim() < low || t.dim() > high)
      detail::adapter_fail(name_, g.name(c),
                           std::string(component_name(c)) + " has shape " + detail::shape_string(t.sizes()) + ", " +
                               std::to_string(t.dim()) + " dimensions where " + std::to_string(low) +
                               (low == high ? "" : " to " + std::to_string(high)) + " are expected",
                           "re-export the adapter");
  }

  [[noreturn]] void mismatch(const key_group& g, component a, component b, const std::string& why) const {
    detail::adapter_fail(name_, g.name(a),
                         std::string(component_name(a)) + " " + detail::shape_string(tensor(g.name(a)).sizes()) +
                             " does not fit " + std::string(component_name(b)) + " " +
                             detail::shape_string(tensor(g.name(b)).sizes()) + ": " + why,
                         "re-export the adapter; its factors do not belong together");
  }

  adapter_group describe(key_group keys) const {
    adapter_group g;
    g.keys = std::move(keys);
    const auto& k = g.keys;
    using c = component;
    if (k.has(c::alpha)) {
      const auto& a = tensor(k.name(c::alpha));
      if (a.numel() != 1)
        detail::adapter_fail(name_, k.name(c::alpha), "alpha has " + std::to_string(a.numel()) + " elements, not 1",
                             "store alpha as a scalar");
      g.alpha = a.to(at::kDouble).item<double>();
    }
    if (k.has(c::diff_b)) g.bias_shape = tensor(k.name(c::diff_b)).sizes().vec();
    if (!k.kind) return g;
    switch (*k.kind) {
      case adapter_kind::lora: {
        need_dims(k, c::lora_up, 2, 5);
        need_dims(k, c::lora_down, 2, 5);
        const auto& up = tensor(k.name(c::lora_up));
        const auto& down = tensor(k.name(c::lora_down));
        const std::int64_t up_rank = detail::trailing_numel(up.sizes(), 1);
        g.rank = down.size(0);
        g.rows = up.size(0);
        if (k.has(c::lora_mid)) {
          need_dims(k, c::lora_mid, 3, 5);
          const auto& mid = tensor(k.name(c::lora_mid));
          if (mid.size(0) != up_rank) mismatch(k, c::lora_mid, c::lora_up, "mid's dim 0 must be up's rank");
          if (mid.size(1) != down.size(0)) mismatch(k, c::lora_mid, c::lora_down, "mid's dim 1 must be down's rank");
          g.cols = detail::trailing_numel(down.sizes(), 1) * detail::trailing_numel(mid.sizes(), 2);
        } else {
          if (up_rank != down.size(0)) mismatch(k, c::lora_up, c::lora_down, "up's rank must equal down's dim 0");
          g.cols = detail::trailing_numel(down.sizes(), 1);
        }
        break;
      }
      case adapter_kind::loha: {
        const bool tucker = k.has(c::hada_t1);
        for (auto role : {c::hada_w1_a, c::hada_w1_b, c::hada_w2_a, c::hada_w2_b}) need_dims(k, role, 2, 2);
        g.rank = dim_of(g, c::hada_w1_b, 0);
        std::int64_t rows[2], cols[2];
        const component parts[2][3] = {{c::hada_w1_a, c::hada_w1_b, c::hada_t1}, {c::hada_w2_a, c::hada_w2_b, c::hada_t2}};
        for (int h = 0; h < 2; ++h) {
          const auto& wa = tensor(k.name(parts[h][0]));
          const auto& wb = tensor(k.name(parts[h][1]));
          if (tucker) {
            need_dims(k, parts[h][2], 2, 5);
            const auto& t = tensor(k.name(parts[h][2]));
            if (t.size(0) != wa.size(0)) mismatch(k, parts[h][2], parts[h][0], "t's dim 0 must be w_a's dim 0");
            if (t.size(1) != wb.size(0)) mismatch(k, parts[h][2], parts[h][1], "t's dim 1 must be w_b's dim 0");
            rows[h] = wa.size(1);
            cols[h] = wb.size(1) * detail::trailing_numel(t.sizes(), 2);
          } else {
            if (wa.size(1) != wb.size(0)) mismatch(k, parts[h][0], parts[h][1], "w_a's dim 1 must equal w_b's dim 0");
            rows[h] = wa.size(0);
            cols[h] = wb.size(1);
          }
        }
        if (rows[0] != rows[1] || cols[0] != cols[1])
          mismatch(k, c::hada_w1_a, c::hada_w2_a, "both Hadamard factors must rebuild to the same shape");
        g.rows = rows[0];
        g.cols = cols[0];
        break;
      }
      case adapter_kind::lokr: {
        std::int64_t a = 0, cc = 0, p = 0, q = 0, extra = 1;
        std::optional<std::int64_t> dim;
        if (k.has(c::lokr_w1)) {
          need_dims(k, c::lokr_w1, 2, 2);
          a = dim_of(g, c::lokr_w1, 0), cc = dim_of(g, c::lokr_w1, 1);
        } else {
          need_dims(k, c::lokr_w1_a, 2, 2);
          need_dims(k, c::lokr_w1_b, 2, 2);
          if (dim_of(g, c::lokr_w1_a, 1) != dim_of(g, c::lokr_w1_b, 0))
            mismatch(k, c::lokr_w1_a, c::lokr_w1_b, "w1_a's dim 1 must equal w1_b's dim 0");
          a = dim_of(g, c::lokr_w1_a, 0), cc = dim_of(g, c::lokr_w1_b, 1);
          dim = dim_of(g, c::lokr_w1_b, 0);
        }
        if (k.has(c::lokr_w2)) {
          need_dims(k, c::lokr_w2, 2, 5);
          const auto& w2 = tensor(k.name(c::lokr_w2));
          p = w2.size(0), q = w2.size(1), extra = detail::trailing_numel(w2.sizes(), 2);
        } else {
          need_dims(k, c::lokr_w2_a, 2, 2);
          need_dims(k, c::lokr_w2_b, 2, 2);
          const auto& wa = tensor(k.name(c::lokr_w2_a));
          const auto& wb = tensor(k.name(c::lokr_w2_b));
          if (k.has(c::lokr_t2)) {
            need_dims(k, c::lokr_t2, 2, 5);
            const auto& t = tensor(k.name(c::lokr_t2));
            if (t.size(0) != wa.size(0)) mismatch(k, c::lokr_t2, c::lokr_w2_a, "t2's dim 0 must be w2_a's dim 0");
            if (t.size(1) != wb.size(0)) mismatch(k, c::lokr_t2, c::lokr_w2_b, "t2's dim 1 must be w2_b's dim 0");
            p = wa.size(1), q = wb.size(1), extra = detail::trailing_numel(t.sizes(), 2);
          } else {
            if (wa.size(1) != wb.size(0)) mismatch(k, c::lokr_w2_a, c::lokr_w2_b, "w2_a's dim 1 must equal w2_b's dim 0");
            p = wa.size(0), q = wb.size(1);
          }
          dim = wb.size(0);
        }
        g.rank = dim.value_or(0);
        g.rows = a * p;
        g.cols = cc * q * extra;
        break;
      }
      case adapter_kind::diff: {
        const auto& d = tensor(k.name(c::diff));
        g.shape = d.sizes().vec();
        g.rows = d.dim() == 0 ? 1 : d.size(0);
        g.cols = d.dim() == 0 ? 1 : detail::trailing_numel(d.sizes(), 1);
        break;
      }
      case adapter_kind::set: {
        const auto& s = tensor(k.name(c::set_weight));
        g.shape = s.sizes().vec();
        g.rows = s.dim() == 0 ? 1 : s.size(0);
        g.cols = s.dim() == 0 ? 1 : detail::trailing_numel(s.sizes(), 1);
        break;
      }
    }
    // Alpha: the group's own tensor, else PEFT's rule for LoRA groups.
    const bool peft_rules = peft_ && *k.kind == adapter_kind::lora;
    if (!g.alpha && peft_rules) g.alpha = peft_alpha(*peft_, k.base);
    const bool has_rank = g.rank > 0;
    if (g.alpha && has_rank) {
      g.scale = (peft_rules && peft_->use_rslora) ? *g.alpha / std::sqrt(static_cast<double>(g.rank))
                                                  : *g.alpha / static_cast<double>(g.rank);
    }
    return g;
  }

  std::string name_;
  std::map<std::string, at::Tensor> tensors_;
  std::optional<peft_config> peft_;
  std::vector<adapter_group> groups_;
  std::vector<std::string> unrecognized_;
};

/// An adapter with the strengths it is applied at:
/// W' = W·strength_model (when ≠ 1) + strength·scale·ΔW.
struct adapter_use {
  std::shared_ptr<const adapter> file;
  double strength = 1.0;
  double strength_model = 1.0;
};

/// Adapters applied in order, on one float32 copy of each weight, rounded once.
using adapter_set = std::vector<adapter_use>;

}  // namespace distorch::inline v0
