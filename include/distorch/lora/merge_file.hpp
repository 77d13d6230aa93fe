#pragma once
/// \file
/// `merge_to_file`: bakes adapters into a new safetensors file, tensor by tensor. The header is
/// written first from the model's records; then each tensor is loaded, merged when an adapter
/// targets it, and written, so peak memory is one tensor plus the adapters, never the whole model.
/// The file goes to a temporary file in the target's folder, renamed over the target at the end:
/// a failure never leaves a partial file. `distorch lora apply` is this function.
///
/// Example:
/// \code
///   auto model = distorch::open_weights("sdxl.safetensors");
///   distorch::adapter_set adapters{{std::make_shared<distorch::adapter>(distorch::load_adapter("style.safetensors")), 0.8}};
///   auto report = distorch::merge_to_file(*model, adapters, "merged.safetensors");
///   std::cout << report.patched << " tensors merged\n";
/// \endcode

#include <ATen/core/Tensor.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "distorch/core/error.hpp"
#include "distorch/core/progress.hpp"
#include "distorch/io/safetensors.hpp"
#include "distorch/io/weight_source.hpp"
#include "distorch/lora/binding.hpp"
#include "distorch/lora/merge.hpp"

namespace distorch::inline v0 {

/// How to merge to a file.
struct merge_file_options {
  binding_options binding;                           ///< strictness and prefix rules
  c10::Device compute_device = c10::Device(c10::kCPU);
  /// Called after each tensor is written, as ("merging", written, total, "tensors"); a big model
  /// takes minutes, so a program can show how far it is. Empty: no reports.
  progress_callback progress;
};

/// What was written.
struct merge_file_report {
  std::size_t tensors = 0;   ///< tensors written
  std::size_t patched = 0;   ///< of which merged with at least one adapter
  binding_report binding;    ///< matched and unmatched keys
};

namespace detail {

/// A file written under a temporary name in the target's folder and renamed over the target by
/// `commit`; destroyed uncommitted, it removes the temporary file.
class atomic_output_file {
 public:
  explicit atomic_output_file(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp.XXXXXX") {
    fd_ = ::mkstemp(tmp_.data());
    if (fd_ < 0)
      throw format_error({"creating output file", path_, std::nullopt, std::strerror(errno),
                          "check that the output folder exists and is writable"});
  }
  atomic_output_file(const atomic_output_file&) = delete;
  atomic_output_file& operator=(const atomic_output_file&) = delete;
  ~atomic_output_file() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }
  void write(const void* data, std::size_t n) {
    const auto* p = static_cast<const char*>(data);
    while (n > 0) {
      const ::ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) throw format_error({"writing output file", tmp_, std::nullopt, std::strerror(errno), "check free disk space"});
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }
  void commit() {
    const bool ok = ::fchmod(fd_, 0644) == 0 && ::fsync(fd_) == 0;
    const int saved = errno;
    const bool closed = ::close(fd_) == 0;
    fd_ = -1;
    if (!ok || !closed)
      throw format_error({"finishing output file", tmp_, std::nullopt, std::strerror(ok ? errno : saved), "check free disk space"});
    if (::rename(tmp_.c_str(), path_.c_str()) != 0)
      throw format_error({"renaming output file", path_, std::nullopt, std::strerror(errno), "check that the output path is writable"});
    committed_ = true;
  }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace detail

/// Merges `adapters` into every tensor of `model` they target and writes all tensors to the
/// safetensors file `out_path`, keeping the model's metadata and adding `distorch_lora`
/// ("file:strength ..."). Tensors are laid out largest element size first, then by name, so each
/// is aligned to its element size.
///
/// Throws `lora_error` as `adapter_binding::bind` does (shape mismatches; unmatched keys in strict
/// mode) before anything is written, and `format_error` for a dtype safetensors cannot hold and
/// for I/O failures; `out_path` is then untouched.
/// \code
///   distorch::merge_file_options o;
///   o.binding.strict = true;
///   o.progress = [](const distorch::progress_report& p) { std::fprintf(stderr, "\r%llu/%llu", (unsigned long long)p.done, (unsigned long long)p.total); };
///   distorch::merge_to_file(*model, adapters, "merged.safetensors", o);
/// \endcode
inline merge_file_report merge_to_file(const weight_source& model, const adapter_set& adapters, const std::string& out_path,
                                       const merge_file_options& options = {}) {
  const auto binding = adapter_binding::bind(model.records(), adapters, options.binding);
  std::vector<const tensor_record*> order;
  for (const auto& r : model.records()) {
    if (r.type == dtype::opaque || safetensors_dtype_name(r.type).empty())
      throw format_error({"writing " + out_path, r.name, std::nullopt,
                          "dtype " + std::string(dtype_name(r.type)) + " cannot be written to safetensors",
                          "convert the model to safetensors dtypes first"});
    order.push_back(&r);
  }
  std::stable_sort(order.begin(), order.end(), [](const tensor_record* a, const tensor_record* b) {
    const auto sa = dtype_size(a->type), sb = dtype_size(b->type);
    return sa != sb ? sa > sb : a->name < b->name;
  });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  auto& meta = header["__metadata__"] = nlohmann::ordered_json::object();
  for (const auto& [k, v] : model.metadata()) meta[k] = v;
  std::string applied;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    std::ostringstream s;
    s << std::filesystem::path(adapters[i].file->name()).filename().string() << ':' << adapters[i].strength;
    applied += (i ? " " : "") + s.str();
  }
  meta["distorch_lora"] = applied;
  std::uint64_t offset = 0;
  for (const auto* r : order) {
    const auto bytes = static_cast<std::uint64_t>(r->numel()) * dtype_size(r->type);
    header[r->name] = {{"dtype", std::string(safetensors_dtype_name(r->type))},
                       {"shape", r->shape},
                       {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  unsigned char length[8];
  for (int b = 0; b < 8; ++b) length[b] = static_cast<unsigned char>((static_cast<std::uint64_t>(json.size()) >> (8 * b)) & 0xFF);

  detail::atomic_output_file out(out_path);
  out.write(length, 8);
  out.write(json.data(), json.size());
  merge_file_report report;
  report_progress(options.progress, "merging", 0, order.size(), "tensors");
  for (const auto* r : order) {
    at::Tensor t = model.load(r->name);
    if (const auto* patches = binding.patches_for(r->name)) {
      t = t.clone(at::MemoryFormat::Contiguous);  // never write into the source's mapping
      std::vector<merge_step> steps;
      for (const auto& p : *patches) {
        const auto& use = adapters[p.adapter_index];
        steps.push_back({use.file.get(), p.group, p.bias, use.strength, use.strength_model});
      }
      merge_into(t, steps, options.compute_device);
      ++report.patched;
    }
    t = t.contiguous();
    const auto bytes = static_cast<std::size_t>(t.numel()) * t.element_size();
    if (bytes != static_cast<std::size_t>(r->numel()) * dtype_size(r->type))
      throw format_error({"writing " + out_path, r->name, std::nullopt, "the loaded tensor's size differs from its header",
                          "check the model file"});
    out.write(t.data_ptr(), bytes);
    ++report.tensors;
    report_progress(options.progress, "merging", report.tensors, order.size(), "tensors");
  }
  out.commit();
  report.binding = binding.report();
  return report;
}

}  // namespace distorch::inline v0
