// distorch profile: measures the copy links of this machine (host memcpy; with CUDA also pinned and
// pageable host->device, device->host and device->device) and prints bandwidth and latency, or
// the whole profile as JSON, or saves it for `distorch plan --predict --profile FILE`.
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "cli.hpp"
#include "progress.hpp"
#include "distorch/core/bytes.hpp"
#include "distorch/profile/profile.hpp"
#include "distorch/profile/profiler.hpp"

namespace {

const char* profile_help = R"(Measures every copy link among the devices found: host memcpy always; with CUDA,
host->device from pinned and from pageable memory, device->host, and device->device
(peer-to-peer where the pair allows it). Each size gets --warmup untimed copies, then
--repeats timed ones whose median is kept; bandwidth and latency are the least-squares line
t = latency + bytes / bandwidth through the medians. Links this machine lacks are listed as
absent with the reason. A progress bar is drawn on stderr when it is a terminal.

Examples:
  distorch profile
  distorch profile --out profile.json
  distorch profile --json --sizes 1mb,16mb,64mb --repeats 9 > profile.json
  distorch plan --alloc 'cuda:0,8gb;cpu,*' --devices cuda:0=24GiB,cpu=64GiB --units units.json \
                --predict --profile profile.json --compute-gbps 500
Exit codes: 0 ok, 1 bad input, 2 internal error. See docs/profiling.md.)";

struct profile_request {
  bool json = false;
  std::string out;
  std::string sizes;
  std::size_t repeats = 5;
  std::size_t warmup = 1;
};

std::vector<std::uint64_t> parse_sizes(const std::string& text) {
  std::vector<std::uint64_t> sizes;
  std::size_t start = 0;
  while (start <= text.size()) {
    std::size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    const std::string item = text.substr(start, comma - start);
    const auto bytes = distorch::parse_bytes(item);
    if (bytes == 0)
      throw distorch::allocation_error({"parsing --sizes", text, distorch::error_position{"column", start + 1},
                                        "a copy size of 0 bytes measures nothing", "give sizes such as 1mb,16mb,64mb"});
    sizes.push_back(bytes);
    start = comma + 1;
  }
  return sizes;
}

std::string profile_table(const distorch::profile& p) {
  std::string out = "distorch profile: " + p.machine.cpu + " (" + p.machine.host + "), LibTorch " + p.machine.libtorch + ", " +
                    std::to_string(p.repeats) + " repeats (median), " + std::to_string(p.warmup) + " warm-up\n";
  char line[256];
  std::snprintf(line, sizeof line, "  %-44s%12s%14s\n", "Link", "GB/s", "Latency");
  out += line;
  for (const auto& l : p.links) {
    std::snprintf(line, sizeof line, "  %-44s%12.2f%11.1f us\n", l.str().c_str(), l.bandwidth / 1e9, l.latency * 1e6);
    out += line;
    for (const auto& s : l.samples) {
      std::snprintf(line, sizeof line, "      %12s in %10.1f us = %8.2f GB/s\n", distorch::format_bytes(s.bytes).c_str(),
                    s.seconds * 1e6, static_cast<double>(s.bytes) / s.seconds / 1e9);
      out += line;
    }
  }
  for (const auto& a : p.absent) out += "  absent: " + std::string(distorch::link_kind_name(a.kind)) + ": " + a.reason + '\n';
  out += "GB/s = 10^9 bytes per second.\n";
  return out;
}

distorch::cli::command_registration profile_command{{"profile", 40, [](CLI::App& app, auto set_action) {
  auto r = std::make_shared<profile_request>();
  auto* sub = app.add_subcommand("profile", "Measure copy bandwidth and latency between the devices of this machine");
  sub->add_flag("--json", r->json, "Print the profile as JSON");
  sub->add_option("--out", r->out, "Also save the profile as JSON to this file (for plan --predict --profile)");
  sub->add_option("--sizes", r->sizes, "Copy sizes, comma-separated (default 1mb,4mb,16mb,64mb,256mb)");
  sub->add_option("--repeats", r->repeats, "Timed copies per size; the median is kept (default 5)")->check(CLI::Range(1, 1000));
  sub->add_option("--warmup", r->warmup, "Untimed copies before them (default 1)")->check(CLI::Range(0, 1000));
  sub->footer(profile_help);
  sub->callback([r, set_action] {
    set_action([r] {
      distorch::profiler_options options;
      if (!r->sizes.empty()) options.sizes = parse_sizes(r->sizes);
      options.repeats = r->repeats;
      options.warmup = r->warmup;
      distorch::profile p;
      {
        distorch::cli::progress_bar bar;
        options.progress = bar.callback();
        p = distorch::measure_profile(options);
      }
      if (!r->out.empty()) distorch::write_profile_file(p, r->out);
      if (r->json)
        std::cout << distorch::profile_to_json(p).dump(2) << '\n';
      else
        std::cout << profile_table(p) << (r->out.empty() ? "" : "saved to " + r->out + "\n");
      return distorch::cli::exit_ok;
    });
  });
}}};

}  // namespace
