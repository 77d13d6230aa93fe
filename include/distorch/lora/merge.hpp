#pragma once
/// \file
/// The delta math and the merge, in float32 on the compute device, with ComfyUI's semantics:
///
///   W' = W·strength_model (when ≠ 1) + strength·scale·ΔW, rounded once to W's dtype
///
/// - LoRA:  ΔW = up.flatten(1) @ down.flatten(1); with a Tucker mid,
///          ΔW[o,i,h,w] = Σ_r Σ_s up[o,r]·mid[r,s,h,w]·down[s,i].
/// - LoHa:  ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b); with cores t1/t2 each factor is
///          Σ_i Σ_j t[i,j,…]·w_b[j,r]·w_a[i,p] (the layout LyCORIS writes).
/// - LoKr:  ΔW = kron(w1, w2), each full or factored (w2 also through core t2); w1 gains two
///          trailing unit dimensions when w2 is 4-D.
/// - diff:  ΔW = diff (no scale); set: W' = set_weight (strength 0 disables it).
/// - DoRA:  Wc = W + scale·ΔW; Wc ← Wc · dora_scale / (‖Wc‖ + ε) with the norm taken per output
///          row when dora_scale has one value per output row, else per input channel; then
///          W' = W + strength·(Wc − W).
///
/// Each weight is processed in blocks of rows: a block is read into a float32 buffer, every
/// adapter is applied to it in order, and it is written back with one rounding (round to nearest
/// even, LibTorch's conversion). The scratch is one block (a few MiB), not a second copy of the
/// weight. DoRA needs norms over whole columns, so a DoRA'd weight is taken whole: its scratch is one
/// float32 copy of the weight.
///
/// Example:
/// \code
///   std::vector<distorch::merge_step> steps{{adapter.get(), &adapter->groups()[0], false, 0.8, 1.0}};
///   distorch::merge_into(weight, steps, c10::Device(c10::kCUDA, 0));   // weight changes in place
/// \endcode

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/kron.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <span>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/lora/adapter.hpp"

namespace distorch::inline v0 {

/// One group applied to one tensor with its strengths.
struct merge_step {
  const adapter* source = nullptr;
  const adapter_group* group = nullptr;
  bool bias = false;            ///< apply the group's `.diff_b` (the tensor is the bias)
  double strength = 1.0;
  double strength_model = 1.0;
};

/// Float32 scratch per block of rows when no DoRA forces whole tensors.
inline constexpr std::int64_t merge_block_bytes = std::int64_t{4} << 20;

namespace detail {

/// The factors of one step, converted once per merge to float32 on the compute device, in a form
/// whose rows can be produced block by block.
struct prepared_step {
  adapter_kind kind = adapter_kind::diff;
  bool bias = false;
  bool dora = false;
  bool dora_output_axis = false;
  double strength = 1.0;
  double strength_model = 1.0;
  double scale = 1.0;
  at::Tensor left, right;             // lora: ΔW = left @ right
  at::Tensor left2, right2;           // loha: ΔW = (left @ right) ⊙ (left2 @ right2)
  at::Tensor w1, w2;                  // lokr: ΔW = kron(w1, w2); rows of w2 per row of w1 = w2.size(0)
  at::Tensor full;                    // diff / set / diff_b: [rows, cols]
  at::Tensor dora_scale;              // flattened magnitudes
};

inline at::Tensor as_f32(const at::Tensor& t, c10::Device device) {
  return t.to(device, at::kFloat, /*non_blocking=*/false, /*copy=*/false);
}

/// Σ_j core[i,j,k…]·right[j,r] laid out [i, r, k…] and flattened to [i, r·k…]: the Tucker
/// contraction LoCon's mid and LyCORIS' t1/t2/t2 all share.
inline at::Tensor tucker_right(const at::Tensor& core, const at::Tensor& right) {
  const std::int64_t i = core.size(0), j = core.size(1), r = right.size(1);
  const std::int64_t k = core.numel() / std::max<std::int64_t>(1, i * j);
  auto moved = core.reshape({i, j, k}).permute({0, 2, 1}).reshape({i * k, j});   // [i·k, j]
  return moved.mm(right).reshape({i, k, r}).permute({0, 2, 1}).reshape({i, r * k});
}

inline prepared_step prepare(const merge_step& s, c10::Device dev, std::int64_t rows, std::int64_t cols) {
  const adapter& a = *s.source;
  const adapter_group& g = *s.group;
  using c = component;
  prepared_step p;
  p.bias = s.bias;
  p.strength = s.strength;
  p.strength_model = s.strength_model;
  p.scale = g.scale;
  auto t = [&](component role) { return as_f32(a.tensor(g, role), dev); };
  if (s.bias) {
    p.kind = adapter_kind::diff;
    p.full = t(c::diff_b).reshape({rows, cols});
    p.scale = 1.0;
    return p;
  }
  p.kind = *g.keys.kind;
  p.dora = g.keys.dora();
  if (p.dora) {
    p.dora_output_axis = dora_on_output_axis(a.tensor(g, c::dora_scale), rows);
    p.dora_scale = t(c::dora_scale).reshape({-1});
  }
  switch (p.kind) {
    case adapter_kind::lora:
      p.left = t(c::lora_up).flatten(1);
      p.right = g.keys.has(c::lora_mid) ? tucker_right(t(c::lora_mid), t(c::lora_down).flatten(1))
                                        : t(c::lora_down).flatten(1);
      break;
    case adapter_kind::loha:
      if (g.keys.has(c::hada_t1)) {
        p.left = t(c::hada_w1_a).t();
        p.right = tucker_right(t(c::hada_t1), t(c::hada_w1_b));
        p.left2 = t(c::hada_w2_a).t();
        p.right2 = tucker_right(t(c::hada_t2), t(c::hada_w2_b));
      } else {
        p.left = t(c::hada_w1_a), p.right = t(c::hada_w1_b);
        p.left2 = t(c::hada_w2_a), p.right2 = t(c::hada_w2_b);
      }
      break;
    case adapter_kind::lokr: {
      p.w1 = g.keys.has(c::lokr_w1) ? t(c::lokr_w1) : t(c::lokr_w1_a).mm(t(c::lokr_w1_b));
      if (g.keys.has(c::lokr_w2)) {
        p.w2 = t(c::lokr_w2);
      } else if (g.keys.has(c::lokr_t2)) {
        const auto& core = a.tensor(g, c::lokr_t2);
        std::vector<std::int64_t> shape{a.tensor(g, c::lokr_w2_a).size(1), a.tensor(g, c::lokr_w2_b).size(1)};
        for (std::int64_t d = 2; d < core.dim(); ++d) shape.push_back(core.size(d));
        p.w2 = t(c::lokr_w2_a).t().mm(tucker_right(t(c::lokr_t2), t(c::lokr_w2_b))).reshape(shape);
      } else {
        p.w2 = t(c::lokr_w2_a).mm(t(c::lokr_w2_b));
      }
      // kron pairs dimensions one to one: w1 gets the trailing unit dimensions of a conv w2.
      while (p.w1.dim() < p.w2.dim()) p.w1 = p.w1.unsqueeze(-1);
      // LibTorch 1.13's kron views its operands and fails on strided ones.
      p.w1 = p.w1.contiguous(), p.w2 = p.w2.contiguous();
      break;
    }
    case adapter_kind::diff: p.full = t(c::diff).reshape({rows, cols}); break;
    case adapter_kind::set: p.full = t(c::set_weight).reshape({rows, cols}); break;
  }
  return p;
}

/// Rows [r0, r1) of ΔW (unscaled) as a float32 [r1-r0, cols] tensor.
inline at::Tensor delta_rows(const prepared_step& p, std::int64_t r0, std::int64_t r1, std::int64_t cols) {
  switch (p.kind) {
    case adapter_kind::lora: return p.left.narrow(0, r0, r1 - r0).mm(p.right);
    case adapter_kind::loha:
      return p.left.narrow(0, r0, r1 - r0).mm(p.right).mul_(p.left2.narrow(0, r0, r1 - r0).mm(p.right2));
    case adapter_kind::lokr: {
      const std::int64_t per = p.w2.size(0);
      const std::int64_t a0 = r0 / per, a1 = (r1 + per - 1) / per;
      auto block = at::kron(p.w1.narrow(0, a0, a1 - a0), p.w2).reshape({(a1 - a0) * per, cols});
      return block.narrow(0, r0 - a0 * per, r1 - r0);
    }
    case adapter_kind::diff:
    case adapter_kind::set: return p.full.narrow(0, r0, r1 - r0);
  }
  return {};
}

/// Applies one non-DoRA step to the float32 rows [r0, r1) held in `buf`.
inline void apply_rows(at::Tensor& buf, const prepared_step& p, std::int64_t r0, std::int64_t r1, std::int64_t cols) {
  if (p.strength_model != 1.0) buf.mul_(p.strength_model);
  if (p.strength == 0.0) return;  // bit-identical: W + 0·ΔW would turn -0 into +0
  switch (p.kind) {
    case adapter_kind::lora:
      // One fused pass over the block: buf = buf + (strength·scale)·(up @ down).
      buf.addmm_(p.left.narrow(0, r0, r1 - r0), p.right, /*beta=*/1.0, /*alpha=*/p.strength * p.scale);
      return;
    case adapter_kind::set: buf.copy_(delta_rows(p, r0, r1, cols)); return;
    case adapter_kind::diff: buf.add_(delta_rows(p, r0, r1, cols), p.strength); return;
    default: buf.add_(delta_rows(p, r0, r1, cols), p.strength * p.scale); return;
  }
}

/// Applies one DoRA step to the whole float32 weight `w` ([rows, cols]). Two passes over ΔW in
/// blocks: the norms of W + scale·ΔW, then W' = W + s·(f·(W + scale·ΔW) − W) with
/// f = dora_scale / (norm + ε), rearranged as W·(1 + s(f−1)) + (s·scale)·f·ΔW so no second
/// full-size buffer is needed.
inline void apply_dora(at::Tensor& w, const prepared_step& p, std::int64_t rows, std::int64_t cols,
                       std::int64_t in_channels, std::int64_t block_rows) {
  if (p.strength_model != 1.0) w.mul_(p.strength_model);
  if (p.strength == 0.0) return;
  const bool output_axis = p.dora_output_axis;
  at::Tensor sumsq = at::zeros({output_axis ? rows : cols}, w.options());
  for (std::int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const std::int64_t r1 = std::min(rows, r0 + block_rows);
    auto wc = w.narrow(0, r0, r1 - r0).add(delta_rows(p, r0, r1, cols), p.scale);
    if (output_axis) sumsq.narrow(0, r0, r1 - r0).copy_(wc.mul(wc).sum(1));
    else sumsq.add_(wc.mul(wc).sum(0));
  }
  at::Tensor norm = output_axis ? sumsq.sqrt() : sumsq.reshape({in_channels, cols / in_channels}).sum(1).sqrt();
  // ε as ComfyUI adds it: the float32 machine epsilon.
  at::Tensor f = p.dora_scale.div(norm.add(static_cast<double>(FLT_EPSILON)));
  f = output_axis ? f.reshape({rows, 1}) : f.reshape({in_channels, 1}).expand({in_channels, cols / in_channels}).reshape({1, cols});
  const at::Tensor keep = f.sub(1.0).mul_(p.strength).add_(1.0);  // 1 + s(f − 1)
  const at::Tensor gain = f.mul(p.strength * p.scale);
  for (std::int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const std::int64_t r1 = std::min(rows, r0 + block_rows);
    auto block = w.narrow(0, r0, r1 - r0);
    auto k = output_axis ? keep.narrow(0, r0, r1 - r0) : keep;
    auto gn = output_axis ? gain.narrow(0, r0, r1 - r0) : gain;
    block.mul_(k).add_(delta_rows(p, r0, r1, cols).mul_(gn));
  }
}

}  // namespace detail

/// Merges `steps` into `weight` in place: float32 on `compute_device`, in step order, one rounding
/// to the weight's dtype at the end. `weight` may live on any device; when it is not on the compute
/// device its blocks travel there and back.
///
/// Throws `lora_error` when the weight is not floating point or a step does not fit it (binding
/// checks this before loading; this guards direct callers).
/// \code
///   distorch::merge_into(w, steps, at::kCPU);
/// \endcode
inline void merge_into(const at::Tensor& weight, std::span<const merge_step> steps, c10::Device compute_device,
                       std::int64_t block_bytes = merge_block_bytes) {
  if (steps.empty()) return;
  if (!weight.is_floating_point())
    throw lora_error({"merging adapters", "(weight)", std::nullopt,
                      std::string("weight dtype ") + c10::toString(weight.scalar_type()) + " is not floating point",
                      "patch an unquantized weight"});
  const std::int64_t rows = weight.dim() == 0 ? 1 : weight.size(0);
  const std::int64_t cols = rows == 0 ? 0 : weight.numel() / rows;
  if (weight.numel() == 0) return;
  const std::int64_t in_channels = weight.dim() >= 2 ? weight.size(1) : 1;
  std::vector<detail::prepared_step> prepared;
  prepared.reserve(steps.size());
  bool whole = false;
  for (const auto& s : steps) {
    if (s.source == nullptr || s.group == nullptr)
      throw lora_error({"merging adapters", "(step)", std::nullopt, "a merge step has no adapter or group",
                        "build steps from an adapter_binding"});
    const auto& g = *s.group;
    const bool fits = s.bias ? detail::numel_of(g.bias_shape) == weight.numel()
                             : (g.rows == rows && g.rows * g.cols == weight.numel());
    if (!fits)
      throw lora_error({"merging adapter " + s.source->name(), g.keys.base, std::nullopt,
                        "adapter shape does not fit weight of shape " + detail::shape_string(weight.sizes()),
                        "bind the adapter to the model first"});
    prepared.push_back(detail::prepare(s, compute_device, rows, cols));
    whole = whole || (prepared.back().dora && !s.bias);
  }
  // Work on a contiguous [rows, cols] tensor on the compute device: the weight itself when it
  // already is one, else a staging copy written back at the end.
  const bool direct = weight.device() == compute_device && weight.is_contiguous();
  at::Tensor staged = direct ? weight : weight.to(compute_device, weight.scalar_type(), false, true).contiguous();
  at::Tensor w2d = staged.view({rows, cols});
  const bool is_f32 = weight.scalar_type() == at::kFloat;
  const std::int64_t block_rows =
      whole ? rows : std::clamp<std::int64_t>(block_bytes / std::max<std::int64_t>(1, cols * 4), 1, rows);
  const std::int64_t dora_block = std::clamp<std::int64_t>(block_bytes / std::max<std::int64_t>(1, cols * 4), 1, rows);
  // float32 weights are merged in place; others through one float32 block buffer, reused for
  // every block and rounded once per element when the block is written back.
  at::Tensor scratch;
  if (!is_f32) scratch = at::empty({block_rows, cols}, staged.options().dtype(at::kFloat));
  for (std::int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const std::int64_t r1 = std::min(rows, r0 + block_rows);
    at::Tensor slot = w2d.narrow(0, r0, r1 - r0);
    at::Tensor buf = is_f32 ? slot : scratch.narrow(0, 0, r1 - r0);
    if (!is_f32) buf.copy_(slot);
    for (const auto& p : prepared) {
      if (p.dora && !p.bias) detail::apply_dora(buf, p, rows, cols, in_channels, dora_block);
      else detail::apply_rows(buf, p, r0, r1, cols);
    }
    if (!is_f32) slot.copy_(buf);
  }
  if (!direct) weight.copy_(staged.view(weight.sizes()));
}

}  // namespace distorch::inline v0
