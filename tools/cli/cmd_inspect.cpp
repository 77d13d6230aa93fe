// distorch inspect: a weight file's format, metadata and tensors (name, type, shape, bytes,
// offset), or one tensor's values as float. Reads headers only unless --values is given.
#include <ATen/core/Tensor.h>

#include <iomanip>
#include <iostream>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "distorch/core/bytes.hpp"
#include "distorch/io/open.hpp"

namespace {

struct inspect_args {
  std::string file;
  std::string tensor;
  bool values = false;
  bool json = false;
};

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

struct row {
  std::string name, type, shape, bytes, offset;
};

row row_of(const distorch::weight_source& src, const distorch::tensor_record& r) {
  const auto loc = src.locate(r.name);
  const auto bytes = loc ? loc->bytes : distorch::inventory::record_bytes(r);
  return {r.name, loc && !loc->stored_type.empty() ? loc->stored_type : std::string(distorch::dtype_name(r.type)),
          shape_text(r.shape), std::to_string(bytes), loc ? std::to_string(loc->offset) : "-"};
}

nlohmann::ordered_json tensor_json(const distorch::weight_source& src, const distorch::tensor_record& r) {
  const auto loc = src.locate(r.name);
  nlohmann::ordered_json j{{"name", r.name},
                           {"dtype", std::string(distorch::dtype_name(r.type))},
                           {"shape", r.shape},
                           {"bytes", loc ? loc->bytes : distorch::inventory::record_bytes(r)}};
  if (loc) {
    j["stored_type"] = loc->stored_type;
    j["offset"] = loc->offset;
    if (loc->file != src.path()) j["file"] = loc->file;
  }
  return j;
}

int print_listing(const distorch::weight_source& src, bool json) {
  std::uint64_t total = 0;
  for (const auto& r : src.records()) {
    const auto loc = src.locate(r.name);
    total += loc ? loc->bytes : distorch::inventory::record_bytes(r);
  }
  if (json) {
    nlohmann::ordered_json out{{"file", src.path()}, {"format", src.format()}};
    out["metadata"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : src.metadata()) out["metadata"][k] = v;
    out["tensor_count"] = src.records().size();
    out["total_bytes"] = total;
    out["tensors"] = nlohmann::ordered_json::array();
    for (const auto& r : src.records()) out["tensors"].push_back(tensor_json(src, r));
    std::cout << out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
    return distorch::cli::exit_ok;
  }
  std::cout << "file:     " << src.path() << "\nformat:   " << src.format() << '\n';
  if (!src.metadata().empty()) {
    std::cout << "metadata:\n";
    for (const auto& [k, v] : src.metadata()) std::cout << "  " << k << ": " << v << '\n';
  }
  std::cout << "tensors:  " << src.records().size() << " (" << distorch::format_bytes(total) << ")\n\n";
  std::vector<row> rows{{"NAME", "TYPE", "SHAPE", "BYTES", "OFFSET"}};
  for (const auto& r : src.records()) rows.push_back(row_of(src, r));
  std::size_t w[4] = {0, 0, 0, 0};
  for (const auto& r : rows) {
    w[0] = std::max(w[0], r.name.size());
    w[1] = std::max(w[1], r.type.size());
    w[2] = std::max(w[2], r.shape.size());
    w[3] = std::max(w[3], r.bytes.size());
  }
  for (const auto& r : rows)
    std::cout << std::left << std::setw(static_cast<int>(w[0])) << r.name << "  " << std::setw(static_cast<int>(w[1]))
              << r.type << "  " << std::setw(static_cast<int>(w[2])) << r.shape << "  " << std::right
              << std::setw(static_cast<int>(w[3])) << r.bytes << "  " << r.offset << '\n';
  return distorch::cli::exit_ok;
}

int print_tensor(const distorch::weight_source& src, const std::string& name, bool values, bool json) {
  const distorch::tensor_record* record = nullptr;
  for (const auto& r : src.records())
    if (r.name == name) record = &r;
  if (record == nullptr)
    throw distorch::format_error({"inspecting " + src.path(), name, std::nullopt, "no tensor of that name",
                                  "list the tensors with 'distorch inspect " + src.path() + "'"});
  auto info = tensor_json(src, *record);
  if (!values) {
    if (json) {
      std::cout << info.dump(2) << '\n';
    } else {
      const auto r = row_of(src, *record);
      std::cout << r.name << "  " << r.type << "  " << r.shape << "  " << r.bytes << " bytes  offset " << r.offset << '\n';
    }
    return distorch::cli::exit_ok;
  }
  const at::Tensor t = src.load(name).to(at::kFloat).contiguous();
  const float* p = t.data_ptr<float>();
  const auto n = static_cast<std::size_t>(t.numel());
  if (json) {
    auto& v = info["values"] = nlohmann::ordered_json::array();
    for (std::size_t i = 0; i < n; ++i) v.push_back(p[i]);  // NaN and infinity print as null
    std::cout << info.dump(2) << '\n';
    return distorch::cli::exit_ok;
  }
  const auto r = row_of(src, *record);
  std::cout << r.name << "  " << r.type << "  " << r.shape << '\n';
  std::cout << std::setprecision(std::numeric_limits<float>::max_digits10);
  for (std::size_t i = 0; i < n; ++i) std::cout << p[i] << ((i + 1) % 8 == 0 || i + 1 == n ? '\n' : ' ');
  return distorch::cli::exit_ok;
}

distorch::cli::command_registration inspect_command{{"inspect", 10, [](CLI::App& app, auto set_action) {
  auto* sub = app.add_subcommand("inspect", "Show a weight file's format, metadata and tensors, or one tensor's values");
  auto args = std::make_shared<inspect_args>();
  sub->add_option("FILE", args->file,
                  "A weight file: .safetensors, model.safetensors.index.json, .gguf, or a PyTorch .bin/.pt")
      ->required();
  sub->add_option("--tensor", args->tensor, "Show only this tensor");
  sub->add_flag("--values", args->values, "With --tensor: print its values as float (GGUF blocks dequantized)");
  sub->add_flag("--json", args->json, "Print as JSON");
  sub->footer(
      "Only the headers are read, unless --values asks for one tensor's data.\n"
      "Examples:\n"
      "  distorch inspect model.safetensors\n"
      "  distorch inspect ckpt/model.safetensors.index.json --json\n"
      "  distorch inspect llama-q4_k.gguf --tensor blk.0.attn_q.weight\n"
      "  distorch inspect model.safetensors --tensor blocks.0.attn.qkv.weight --values\n"
      "Exit codes: 0 ok, 1 bad input (unreadable or malformed file, unknown tensor), 2 internal error.");
  sub->callback([args, set_action] {
    set_action([args] {
      if (args->values && args->tensor.empty())
        throw distorch::cli::usage_error(
            "inspect " + args->file + ": --values needs --tensor NAME (fix: name the tensor to print, e.g. --tensor " +
            "blocks.0.weight --values; 'distorch inspect " + args->file + "' lists them)");
      const auto src = distorch::open_weights(args->file);
      if (!args->tensor.empty()) return print_tensor(*src, args->tensor, args->values, args->json);
      return print_listing(*src, args->json);
    });
  });
}}};

}  // namespace
