#pragma once
/// \file
/// safetensors files as `weight_source`s: `safetensors_source` for one file and
/// `safetensors_index_source` for a sharded checkpoint (`model.safetensors.index.json` plus its
/// shards), which presents every shard as one source.
///
/// Opening reads only the header (no mapping, no tensor data), so listing or planning from a
/// checkpoint larger than RAM costs kilobytes. The first load maps the file; tensors are then
/// zero-copy views into the mapping (see io/torch_tensor.hpp), which stays alive while any tensor
/// made from it does, even after the source is destroyed or the file is replaced on disk.
///
/// Example:
/// \code
///   distorch::safetensors_source src("model.safetensors");
///   at::Tensor w = src.load("blocks.0.attn.qkv.weight");
///   src.metadata().at("format");   // "pt"
/// \endcode

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/io/mapped_file.hpp"
#include "distorch/io/safetensors.hpp"
#include "distorch/io/safetensors_index.hpp"
#include "distorch/io/torch_tensor.hpp"
#include "distorch/io/weight_source.hpp"

namespace distorch::inline v0 {

namespace detail {
/// Tensors materialized by any safetensors source in this process. Lets tests prove that
/// header-only paths (inventories, plans) never load tensor data.
inline std::atomic<std::uint64_t> safetensors_loads{0};

/// An open file descriptor, closed on destruction.
struct safetensors_fd {
  int fd = -1;
  explicit safetensors_fd(int f) noexcept : fd(f) {}
  safetensors_fd(const safetensors_fd&) = delete;
  safetensors_fd& operator=(const safetensors_fd&) = delete;
  ~safetensors_fd() {
    if (fd >= 0) ::close(fd);
  }
};

/// Reads exactly `n` bytes at `offset`, or fewer at end of file.
inline std::size_t safetensors_pread(int fd, std::byte* out, std::size_t n, std::uint64_t offset) {
  std::size_t got = 0;
  while (got < n) {
    const ::ssize_t r = ::pread(fd, out + got, n - got, static_cast<off_t>(offset + got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += static_cast<std::size_t>(r);
  }
  return got;
}
}  // namespace detail

/// One safetensors file.
class safetensors_source final : public weight_source {
 public:
  /// Opens `path` and parses its header, reading only the header's bytes. The file stays open, so
  /// a later load reads this file even if the path is replaced meanwhile. Throws `format_error` for
  /// an unreadable or malformed file.
  /// \code
  ///   distorch::safetensors_source src("model.safetensors");
  /// \endcode
  explicit safetensors_source(const std::string& path)
      : path_(path), fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    if (fd_.fd < 0)
      throw format_error({"opening safetensors file", path, std::nullopt, std::strerror(errno),
                          "check that the file exists and is readable"});
    struct stat st {};
    if (::fstat(fd_.fd, &st) != 0 || !S_ISREG(st.st_mode))
      throw format_error({"opening safetensors file", path, std::nullopt, "not a regular file",
                          "pass the path of a .safetensors file"});
    const auto size = static_cast<std::uint64_t>(st.st_size);
    // Read the length first; read the JSON only once the parser's limits allow its size.
    std::vector<std::byte> head(static_cast<std::size_t>(std::min<std::uint64_t>(size, 8)));
    head.resize(detail::safetensors_pread(fd_.fd, head.data(), head.size(), 0));
    if (head.size() == 8) {
      const auto n = detail::safetensors_u64_le(head.data());
      if (n <= safetensors_max_header_bytes && n <= size - 8) {
        head.resize(static_cast<std::size_t>(8 + n));
        if (detail::safetensors_pread(fd_.fd, head.data() + 8, static_cast<std::size_t>(n), 8) != n)
          throw format_error({"reading safetensors header", path, error_position{"offset", 8},
                              "the file ended while reading its header", "the file is being written or truncated"});
      }
    }
    header_ = parse_safetensors(head, path, size);
    records_ = header_.records();
    index_.reserve(header_.tensors.size());
    for (std::size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
  }

  std::string format() const override { return "safetensors"; }
  const std::string& path() const override { return path_; }
  const std::vector<tensor_record>& records() const override { return records_; }
  const std::map<std::string, std::string>& metadata() const override { return header_.metadata; }

  /// A zero-copy view of the tensor (a copy when its bytes are misaligned for its dtype). The
  /// first load maps the file.
  /// \code
  ///   at::Tensor w = src.load("w");
  /// \endcode
  at::Tensor load(const std::string& name) const override {
    const auto& t = descriptor(name);
    if (t.type == dtype::opaque)  // F4, F6_*: packed below a byte per element
      throw format_error({"loading tensor from " + path_, name, error_position{"offset", header_.data_offset + t.begin},
                          "LibTorch has no dtype for the sub-byte safetensors type " + t.dtype_name,
                          "unpack it with the tool that wrote it, or read its raw bytes via locate()"});
    const auto& mapping = file();
    detail::safetensors_loads.fetch_add(1, std::memory_order_relaxed);
    return tensor_from_mapping(mapping, header_.data_offset + t.begin, t.bytes(), t.type, t.shape, t.name, path_);
  }

  std::optional<tensor_location> locate(const std::string& name) const override {
    const auto it = index_.find(name);
    if (it == index_.end()) return std::nullopt;
    const auto& t = header_.tensors[it->second];
    return tensor_location{path_, header_.data_offset + t.begin, t.bytes(), t.dtype_name};
  }

  /// The header's descriptor of a tensor. Throws `format_error` naming an unknown tensor.
  /// \code
  ///   src.descriptor("w").dtype_name;   // "BF16"
  /// \endcode
  const safetensors_tensor& descriptor(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end())
      throw format_error({"loading tensor from " + path_, name, std::nullopt, "no tensor of that name",
                          "list the file's tensors with 'distorch inspect FILE'"});
    return header_.tensors[it->second];
  }

  /// The parsed header (data offset, metadata, descriptors in file order).
  /// \code
  ///   std::uint64_t data_start = src.header().data_offset;
  /// \endcode
  const safetensors_header& header() const noexcept { return header_; }

  /// The file mapping, made on first use from the descriptor opened with the source (through
  /// /dev/fd, so a replaced path cannot swap the file under a parsed header).
  /// \code
  ///   std::span<const std::byte> bytes = src.file()->bytes();
  /// \endcode
  const std::shared_ptr<const mapped_file>& file() const {
    std::lock_guard lock(map_mutex_);
    if (!file_) {
      try {
        file_ = mapped_file::open("/dev/fd/" + std::to_string(fd_.fd));
      } catch (const format_error& e) {
        throw format_error({e.info().doing, path_, std::nullopt, e.info().problem, e.info().fix});
      }
    }
    if (file_->size() != header_.data_offset + header_.data_bytes)
      throw format_error({"mapping safetensors file", path_, std::nullopt, "the file changed size since it was opened",
                          "do not modify weight files in place while they are read"});
    return file_;
  }

  /// True once a load has mapped the file; header-only use never maps it.
  /// \code
  ///   (void)src.records();  assert(!src.mapped());
  /// \endcode
  bool mapped() const {
    std::lock_guard lock(map_mutex_);
    return file_ != nullptr;
  }

 private:
  std::string path_;
  detail::safetensors_fd fd_;
  safetensors_header header_;
  std::vector<tensor_record> records_;
  std::unordered_map<std::string, std::size_t> index_;
  mutable std::mutex map_mutex_;
  mutable std::shared_ptr<const mapped_file> file_;
};

/// A sharded checkpoint: an index file naming, for every tensor, the shard that holds it. Shards
/// are opened in name order; records come shard by shard, each in file order.
class safetensors_index_source final : public weight_source {
 public:
  /// Reads the index and opens every shard it names (relative to the index's folder). Throws
  /// `format_error` for a malformed index or shard, a tensor the index places in a shard that
  /// lacks it, or a shard tensor the index does not list.
  /// \code
  ///   distorch::safetensors_index_source src("ckpt/model.safetensors.index.json");
  /// \endcode
  explicit safetensors_index_source(const std::string& index_path) : path_(index_path) {
    const auto file = mapped_file::open(index_path);
    if (file->size() > safetensors_max_index_bytes)
      throw format_error({"reading safetensors index", index_path, std::nullopt,
                          "index file is " + std::to_string(file->size()) + " bytes, more than any real index",
                          "pass the model.safetensors.index.json of a sharded checkpoint"});
    const auto index = parse_safetensors_index(
        std::string_view(reinterpret_cast<const char*>(file->data()), file->size()), index_path);
    const auto slash = index_path.rfind('/');
    const std::string dir = slash == std::string::npos ? "" : index_path.substr(0, slash + 1);
    metadata_ = index.metadata;
    std::unordered_map<std::string, std::size_t> shard_of_file;
    for (const auto& shard : index.shards()) {
      shard_of_file.emplace(shard, shards_.size());
      shards_.push_back(std::make_unique<safetensors_source>(dir + shard));
      for (const auto& [k, v] : shards_.back()->metadata()) metadata_.emplace(k, v);  // the index wins
    }
    std::unordered_map<std::string_view, std::size_t> listed;
    for (const auto& [tensor, shard] : index.weight_map) {
      const std::size_t s = shard_of_file.at(shard);
      if (!shards_[s]->locate(tensor))
        throw format_error({"opening sharded checkpoint " + index_path, tensor, std::nullopt,
                            "the index places this tensor in " + shard + ", which does not hold it",
                            "regenerate the index for these shards"});
      listed.emplace(tensor, s);
    }
    for (std::size_t s = 0; s < shards_.size(); ++s) {
      for (const auto& r : shards_[s]->records()) {
        const auto it = listed.find(r.name);
        if (it == listed.end() || it->second != s)
          throw format_error({"opening sharded checkpoint " + index_path, r.name, std::nullopt,
                              "shard " + shards_[s]->path() + " holds this tensor but the index " +
                                  (it == listed.end() ? "does not list it" : "places it in another shard"),
                              "regenerate the index for these shards"});
        where_.emplace(r.name, s);
        records_.push_back(r);
      }
    }
  }

  std::string format() const override { return "safetensors-index"; }
  const std::string& path() const override { return path_; }
  const std::vector<tensor_record>& records() const override { return records_; }
  const std::map<std::string, std::string>& metadata() const override { return metadata_; }

  at::Tensor load(const std::string& name) const override { return shard_of(name).load(name); }

  std::optional<tensor_location> locate(const std::string& name) const override {
    const auto it = where_.find(name);
    return it == where_.end() ? std::nullopt : shards_[it->second]->locate(name);
  }

  /// The shard holding a tensor. Throws `format_error` naming an unknown tensor.
  /// \code
  ///   const std::string& file = src.shard_of("lm_head.weight").path();
  /// \endcode
  const safetensors_source& shard_of(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end())
      throw format_error({"loading tensor from " + path_, name, std::nullopt, "no tensor of that name",
                          "list the checkpoint's tensors with 'distorch inspect FILE'"});
    return *shards_[it->second];
  }

  /// Number of shard files.
  /// \code
  ///   std::size_t n = src.shard_count();
  /// \endcode
  std::size_t shard_count() const noexcept { return shards_.size(); }

 private:
  std::string path_;
  std::vector<std::unique_ptr<safetensors_source>> shards_;
  std::vector<tensor_record> records_;
  std::map<std::string, std::string> metadata_;
  std::unordered_map<std::string, std::size_t> where_;
};

}  // namespace distorch::inline v0
