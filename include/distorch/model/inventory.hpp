#pragma once
/// \file
/// The inventory: the ordered units of a model. A unit is the smallest thing placed as a whole:
/// by default a leaf module (all tensors sharing a module path), coarsened by grouping rules such
/// as `blocks\.\d+`. Tensors that share a storage are counted once and always land in one unit.
/// Pure C++: module_inventory.hpp builds records from a live `torch::nn::Module`, the io/ readers
/// build them from file headers.
///
/// Example:
/// \code
///   std::vector<distorch::tensor_record> records{
///       {"blocks.0.attn.weight", distorch::dtype::f32, {64, 64}},
///       {"blocks.0.mlp.weight", distorch::dtype::f32, {256, 64}},
///       {"head.weight", distorch::dtype::f32, {10, 64}}};
///   const distorch::grouping_rule blocks[] = {{R"(blocks\.\d+)"}};
///   auto inv = distorch::inventory::from_records(records, blocks);
///   inv.units().size();   // 2: "blocks.0" and "head"
/// \endcode

#include <cstdint>
#include <numeric>
#include <regex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/core/user_regex.hpp"
#include "distorch/model/dtype.hpp"

namespace distorch::inline v0 {

/// One stored tensor, as known before (or without) loading it.
struct tensor_record {
  std::string name;                 ///< full dotted name, "blocks.0.attn.qkv.weight"
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::uint64_t bytes = 0;          ///< 0: computed as numel × dtype size
  std::uint64_t storage_key = 0;    ///< nonzero: tensors with the same key share one storage
  std::uint64_t storage_bytes = 0;  ///< bytes of that shared storage (0: this tensor's bytes)

  /// Elements: the product of the shape (1 for a 0-d tensor).
  std::int64_t numel() const noexcept {
    return std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
  }
  friend bool operator==(const tensor_record&, const tensor_record&) = default;
};

/// A grouping rule: a regular expression matched against the start of a unit's module path. When
/// it matches a whole prefix of components (`blocks.3` in `blocks.3.attn.qkv`), that prefix
/// becomes the unit. A rule that matches no module path of the model is an `allocation_error`.
struct grouping_rule {
  std::string pattern;
};

/// The smallest thing placed as a whole.
struct unit {
  std::string name;                    ///< module path, "" for tensors at the root
  std::vector<tensor_record> tensors;  ///< in model order
  std::uint64_t bytes = 0;             ///< shared storages counted once
  friend bool operator==(const unit&, const unit&) = default;
};

namespace detail {

/// Module path of a tensor name: everything before the last '.'.
inline std::string_view module_path_of(std::string_view tensor_name) noexcept {
  const auto dot = tensor_name.rfind('.');
  return dot == std::string_view::npos ? std::string_view{} : tensor_name.substr(0, dot);
}

/// Grouping rules, compiled, with a record of which rules grouped anything. A rule that matches no
/// module path is a mistake (a missing `\.`, a model that names its blocks otherwise), never a
/// request for leaf units, so `check_every_rule_matched` makes it an error naming the rule.
class grouper {
 public:
  /// Throws `allocation_error` naming the pattern for an invalid regex.
  explicit grouper(std::span<const grouping_rule> rules) : matched_(rules.size(), false), unmatched_(rules.size()) {
    rules_.reserve(rules.size());
    for (const auto& r : rules) rules_.push_back({r.pattern, compile_user_regex(r.pattern, "compiling grouping rule")});
  }

  /// The unit a module path belongs to: the prefix the first matching rule takes, else the path.
  /// While some rule has matched nothing yet, the rules after the winner are tried too, so that a
  /// rule shadowed by an earlier one does not count as matching nothing.
  std::string_view unit_of(std::string_view path) {
    if (example_.empty() && !path.empty()) example_ = std::string(path);
    ++paths_;
    std::string_view unit = path;
    bool found = false;
    for (std::size_t i = 0; i < rules_.size(); ++i) {
      if (found && unmatched_ == 0) break;
      if (found && matched_[i]) continue;
      const std::size_t length = match_length(rules_[i].re, path);
      if (length == 0) continue;
      if (!matched_[i]) matched_[i] = true, --unmatched_;
      if (!found) found = true, unit = path.substr(0, length);
    }
    return unit;
  }

  /// Throws `allocation_error` naming the first rule that matched none of the paths seen; `what`
  /// says what they are: "tensor" (module paths of tensors) or "unit name". Nothing is checked
  /// when no path was seen.
  void check_every_rule_matched(std::string_view what) const {
    if (unmatched_ == 0 || paths_ == 0) return;
    for (std::size_t i = 0; i < rules_.size(); ++i) {
      if (matched_[i]) continue;
      const std::string seen = example_.empty() ? std::string() : " (the first is '" + example_ + "')";
      const std::string paths = what == "tensor" ? "module path" : std::string(what);
      throw allocation_error({"applying grouping rule", rules_[i].source, error_position{"rule", i + 1},
                              "it matches no " + std::string(what) + ": no " + paths + " begins with a match that " +
                                  "ends at a '.' or at its end" + seen,
                              "write a regex for the start of the module paths, e.g. 'blocks\\.\\d+' for "
                              "'blocks.0.attn', or drop the rule"});
    }
  }

 private:
  struct compiled_rule {
    std::string source;
    std::regex re;
  };

  /// Length of the prefix `re` takes from `path` when it ends at a component boundary, else 0.
  static std::size_t match_length(const std::regex& re, std::string_view path) {
    std::match_results<std::string_view::const_iterator> m;
    if (!std::regex_search(path.begin(), path.end(), m, re, std::regex_constants::match_continuous)) return 0;
    const auto length = static_cast<std::size_t>(m.length(0));
    return length > 0 && (length == path.size() || path[length] == '.') ? length : 0;
  }

  std::vector<compiled_rule> rules_;
  std::vector<bool> matched_;
  std::size_t unmatched_ = 0;
  std::size_t paths_ = 0;
  std::string example_;
};

/// Minimal union-find over unit indices, for merging units that share a storage.
struct unit_union {
  std::vector<std::size_t> parent;
  explicit unit_union(std::size_t n) : parent(n) { std::iota(parent.begin(), parent.end(), std::size_t{0}); }
  std::size_t find(std::size_t i) {
    while (parent[i] != i) i = parent[i] = parent[parent[i]];
    return i;
  }
  void join(std::size_t a, std::size_t b) {
    a = find(a), b = find(b);
    if (a != b) (a < b ? parent[b] = a : parent[a] = b);  // the earlier unit survives
  }
};

}  // namespace detail

/// The ordered units of a model.
class inventory {
 public:
  inventory() = default;
  /// Units given directly, in model order.
  /// \code distorch::inventory inv({{"embed", {}, 4096}, {"blocks.0", {}, 1 << 20}}); \endcode
  explicit inventory(std::vector<unit> units) : units_(std::move(units)) {}

  /// Builds units from tensor records in model order. Units appear in the order of their first
  /// tensor; tensors sharing a `storage_key` pull their units into one (the earliest).
  /// Throws `allocation_error` naming the rule for an invalid grouping regex and for a grouping
  /// rule that matches no tensor, and `format_error` for a tensor name that appears twice.
  /// \code
  ///   auto inv = distorch::inventory::from_records(records);          // leaf-module units
  ///   const distorch::grouping_rule rules[] = {{R"(blocks\.\d+)"}};
  ///   auto blocks = distorch::inventory::from_records(records, rules);
  /// \endcode
  static inventory from_records(std::span<const tensor_record> records, std::span<const grouping_rule> grouping = {}) {
    detail::grouper rules(grouping);
    std::vector<unit> units;
    std::unordered_map<std::string, std::size_t> unit_index;
    std::unordered_map<std::string_view, bool> seen_names;
    std::unordered_map<std::uint64_t, std::size_t> storage_owner;
    std::vector<std::pair<std::size_t, std::size_t>> ties;
    seen_names.reserve(records.size());
    for (const auto& record : records) {
      if (!seen_names.emplace(record.name, true).second)
        throw format_error({"building inventory", record.name, std::nullopt, "tensor name appears twice",
                            "each tensor must have a unique name"});
      const std::string key{rules.unit_of(detail::module_path_of(record.name))};
      auto [it, inserted] = unit_index.try_emplace(key, units.size());
      if (inserted) units.push_back(unit{key, {}, 0});
      const std::size_t u = it->second;
      units[u].tensors.push_back(record);
      if (record.storage_key != 0) {
        auto [owner, fresh] = storage_owner.try_emplace(record.storage_key, u);
        if (!fresh && owner->second != u) ties.emplace_back(owner->second, u);
      }
    }
    rules.check_every_rule_matched("tensor");
    if (!ties.empty()) units = merge_tied(std::move(units), ties);
    for (auto& u : units) u.bytes = unit_bytes(u.tensors);
    return inventory(std::move(units));
  }

  /// The units in model order.
  /// \code for (const auto& u : inv.units()) std::cout << u.name << ' ' << u.bytes << '\n'; \endcode
  const std::vector<unit>& units() const noexcept { return units_; }
  /// Number of units.
  std::size_t size() const noexcept { return units_.size(); }
  /// True when there are no units.
  bool empty() const noexcept { return units_.empty(); }
  /// The unit at position `i`; std::out_of_range past the end.
  const unit& operator[](std::size_t i) const { return units_.at(i); }

  /// Total bytes of all units.
  std::uint64_t total_bytes() const noexcept {
    std::uint64_t total = 0;
    for (const auto& u : units_) total += u.bytes;
    return total;
  }

  /// Index of the unit with this name, or -1.
  std::ptrdiff_t index_of(std::string_view name) const noexcept {
    for (std::size_t i = 0; i < units_.size(); ++i)
      if (units_[i].name == name) return static_cast<std::ptrdiff_t>(i);
    return -1;
  }

  /// The unit holding a tensor, by tensor name, or nullptr.
  const unit* unit_of_tensor(std::string_view tensor_name) const noexcept {
    for (const auto& u : units_)
      for (const auto& t : u.tensors)
        if (t.name == tensor_name) return &u;
    return nullptr;
  }

  friend bool operator==(const inventory&, const inventory&) = default;

  /// Bytes of one tensor record: explicit bytes, else numel × dtype size.
  static std::uint64_t record_bytes(const tensor_record& t) noexcept {
    if (t.bytes != 0) return t.bytes;
    const auto n = t.numel();
    return n <= 0 ? 0 : static_cast<std::uint64_t>(n) * dtype_size(t.type);
  }

  /// Bytes of a set of tensors, counting each shared storage once.
  static std::uint64_t unit_bytes(std::span<const tensor_record> tensors) {
    std::uint64_t total = 0;
    std::unordered_map<std::uint64_t, std::uint64_t> storages;
    for (const auto& t : tensors) {
      const auto b = record_bytes(t);
      if (t.storage_key == 0) {
        total += b;
      } else {
        auto& s = storages[t.storage_key];
        s = std::max({s, b, t.storage_bytes});
      }
    }
    for (const auto& [key, b] : storages) total += b;
    return total;
  }

 private:
  static std::vector<unit> merge_tied(std::vector<unit> units, std::span<const std::pair<std::size_t, std::size_t>> ties) {
    detail::unit_union uf(units.size());
    for (auto [a, b] : ties) uf.join(a, b);
    std::vector<unit> merged;
    std::vector<std::size_t> slot(units.size(), SIZE_MAX);
    for (std::size_t i = 0; i < units.size(); ++i) {
      const std::size_t root = uf.find(i);
      if (root == i) {
        slot[i] = merged.size();
        merged.push_back(std::move(units[i]));
      } else {
        auto& target = merged[slot[root]];
        for (auto& t : units[i].tensors) target.tensors.push_back(std::move(t));
      }
    }
    return merged;
  }

  std::vector<unit> units_;
};

}  // namespace distorch::inline v0
