#pragma once
/// \file
/// `torch_zip_file`: reads the PyTorch zip checkpoints `torch.save` writes (.bin / .pt, the
/// default since PyTorch 1.6). The archive is walked by LibTorch's own
/// `caffe2::serialize::PyTorchStreamReader`; `data.pkl` goes through the allowlisted unpickler of
/// io/pickle.hpp, so nothing in the file is ever executed. Storage records written by
/// `torch.save` are stored uncompressed at 64-byte aligned offsets, so each storage becomes a
/// zero-copy tensor over the file mapping, and every tensor is an `as_strided` view of its
/// storage: views saved from one storage stay views of one storage after loading.
///
/// Example:
/// \code
///   auto ckpt = distorch::torch_zip_file::open("pytorch_model.bin");
///   for (const auto& t : ckpt->state_dict().tensors) std::cout << t.name << '\n';
///   at::Tensor w = ckpt->tensor("encoder.layer.0.attention.self.query.weight");
/// \endcode

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/io/mapped_file.hpp"
#include "distorch/io/pickle.hpp"
#include "distorch/model/dtype.hpp"
#include "distorch/model/torch_dtype.hpp"

namespace distorch::inline v0 {

namespace detail {

inline const std::string torch_zip_convert_fix =
    "convert it in Python: torch.save(torch.load(path), new_path) writes the zip format "
    "(the default since PyTorch 1.6; do not pass _use_new_zipfile_serialization=False)";

/// One central-directory entry: what PyTorchStreamReader does not tell, namely how a record is
/// stored and how large it is, so that sizes are checked before anything is allocated.
struct zip_entry {
  std::uint16_t method = 0;  ///< 0 stored, 8 deflated
  std::uint16_t flags = 0;   ///< general purpose bits; bit 0: encrypted
  bool directory = false;    ///< miniz extracts nothing for directories (DOS attribute 0x10)
  std::uint64_t compressed_size = 0;
  std::uint64_t uncompressed_size = 0;
  std::uint64_t local_header_offset = 0;
  std::uint32_t crc32 = 0;
};

/// CRC-32 (IEEE, reflected), as zip stores it.
inline std::uint32_t zip_crc32(std::span<const std::byte> data) {
  std::uint32_t crc = 0xFFFFFFFFu;
  for (const std::byte b : data) {
    crc ^= static_cast<std::uint8_t>(b);
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

inline std::uint64_t zip_le(std::span<const std::byte> b, std::uint64_t at, int n) {
  std::uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= std::uint64_t{static_cast<std::uint8_t>(b[at + static_cast<std::uint64_t>(i)])} << (8 * i);
  return v;
}

struct zip_directory {
  std::unordered_map<std::string, zip_entry> entries;
  std::string first_name;  ///< PyTorchStreamReader takes the archive's top folder from it
};

/// Reads the central directory (ZIP64 aware). The archive has already passed miniz's checks in
/// PyTorchStreamReader; every read here is still bounds-checked against the file.
inline zip_directory read_zip_directory(std::span<const std::byte> file,
                                                                     const std::string& path) {
  const std::uint64_t size = file.size();
  auto bad = [&](std::uint64_t offset, const std::string& problem) -> format_error {
    return format_error({"reading the zip directory of", path, error_position{"offset", offset}, problem,
                         "copy or download the checkpoint again; the archive is damaged"});
  };
  auto in = [&](std::uint64_t at, std::uint64_t n) { return at <= size && n <= size - at; };
  if (size < 22) throw bad(0, "the file is too short to be a zip archive");
  std::uint64_t eocd = size - 22;
  const std::uint64_t lowest = size > 22 + 65535 ? size - 22 - 65535 : 0;
  while (zip_le(file, eocd, 4) != 0x06054b50) {
    if (eocd == lowest) throw bad(size, "no end-of-central-directory record");
    --eocd;
  }
  std::uint64_t entries = zip_le(file, eocd + 10, 2);
  std::uint64_t cd_size = zip_le(file, eocd + 12, 4);
  std::uint64_t cd_offset = zip_le(file, eocd + 16, 4);
  if (entries == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
    if (eocd < 20 || zip_le(file, eocd - 20, 4) != 0x07064b50) throw bad(eocd, "ZIP64 locator missing");
    const std::uint64_t z64 = zip_le(file, eocd - 20 + 8, 8);
    if (!in(z64, 56) || zip_le(file, z64, 4) != 0x06064b50) throw bad(eocd - 20, "ZIP64 directory record missing");
    entries = zip_le(file, z64 + 32, 8);
    cd_size = zip_le(file, z64 + 40, 8);
    cd_offset = zip_le(file, z64 + 48, 8);
  }
  if (!in(cd_offset, cd_size) || entries > cd_size / 46) throw bad(cd_offset, "the central directory lies outside the file");
  zip_directory out;
  std::uint64_t at = cd_offset;
  const std::uint64_t end = cd_offset + cd_size;
  for (std::uint64_t i = 0; i < entries; ++i) {
    if (end - at < 46 || zip_le(file, at, 4) != 0x02014b50) throw bad(at, "a central directory entry is damaged");
    zip_entry e;
    e.method = static_cast<std::uint16_t>(zip_le(file, at + 10, 2));
    e.flags = static_cast<std::uint16_t>(zip_le(file, at + 8, 2));
    e.crc32 = static_cast<std::uint32_t>(zip_le(file, at + 16, 4));
    e.compressed_size = zip_le(file, at + 20, 4);
    e.uncompressed_size = zip_le(file, at + 24, 4);
    const std::uint64_t name_len = zip_le(file, at + 28, 2), extra_len = zip_le(file, at + 30, 2),
                        comment_len = zip_le(file, at + 32, 2);
    e.local_header_offset = zip_le(file, at + 42, 4);
    if (end - at - 46 < name_len + extra_len + comment_len) throw bad(at, "a central directory entry is damaged");
    std::string name(reinterpret_cast<const char*>(file.data() + at + 46), name_len);
    // ZIP64 extended information: 64-bit values for the fields saturated above, in this order.
    for (std::uint64_t x = at + 46 + name_len, x_end = x + extra_len; x_end - x >= 4;) {
      const auto id = zip_le(file, x, 2), len = zip_le(file, x + 2, 2);
      if (x_end - x - 4 < len) throw bad(x, "a ZIP64 extra field is damaged");
      if (id == 1) {
        std::uint64_t f = x + 4;
        auto take = [&](std::uint64_t& field) {
          if (f + 8 > x + 4 + len) throw bad(x, "a ZIP64 extra field is too short");
          field = zip_le(file, f, 8);
          f += 8;
        };
        if (e.uncompressed_size == 0xFFFFFFFF) take(e.uncompressed_size);
        if (e.compressed_size == 0xFFFFFFFF) take(e.compressed_size);
        if (e.local_header_offset == 0xFFFFFFFF) take(e.local_header_offset);
      }
      x += 4 + len;
    }
    e.directory = (zip_le(file, at + 38, 4) & 0x10) != 0 || (!name.empty() && name.back() == '/');
    if (i == 0) out.first_name = name;
    out.entries.emplace(std::move(name), e);
    at += 46 + name_len + extra_len + comment_len;
  }
  return out;
}

/// Lets PyTorchStreamReader read from our mapping, so the archive it checks is byte for byte the
/// one the tensors view (the path may be replaced on disk meanwhile).
class mapped_read_adapter final : public caffe2::serialize::ReadAdapterInterface {
 public:
  explicit mapped_read_adapter(std::shared_ptr<const mapped_file> file) : file_(std::move(file)) {}
  size_t size() const override { return file_->size(); }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= file_->size()) return 0;
    const auto count = std::min<std::uint64_t>(n, file_->size() - pos);
    std::memcpy(buf, file_->data() + pos, count);
    return count;
  }

 private:
  std::shared_ptr<const mapped_file> file_;
};

inline void byteswap_elements(std::byte* data, std::uint64_t count, std::size_t element_size) {
  if (element_size < 2) return;
  for (std::uint64_t i = 0; i < count; ++i) std::reverse(data + i * element_size, data + (i + 1) * element_size);
}

}  // namespace detail

/// A PyTorch zip checkpoint opened for reading. Cheap to open: only the directory and `data.pkl`
/// are read; tensor bytes are touched when a tensor is asked for.
class torch_zip_file {
 public:
  /// Opens `path`. Throws `format_error` for a file that is no zip archive, for the legacy
  /// (pre-1.6 or `_use_new_zipfile_serialization=False`) format with instructions to convert
  /// it, for a damaged archive, for anything the unpickler rejects, and for storage records that
  /// are missing or whose size differs from what the pickle describes.
  /// \code
  ///   auto ckpt = distorch::torch_zip_file::open("model.pt");
  ///   ckpt->state_dict().tensors.size();
  /// \endcode
  static std::shared_ptr<const torch_zip_file> open(const std::string& path, const pickle_limits& limits = {}) {
    return std::shared_ptr<const torch_zip_file>(new torch_zip_file(mapped_file::open(path), limits));
  }

  /// The path it was opened from.
  const std::string& path() const noexcept { return file_->path(); }
  /// The tensors and storages, as described by `data.pkl` (nested dicts flattened to dotted names).
  const pickled_state_dict& state_dict() const noexcept { return contents_; }
  /// True when the `byteorder` record says "big": tensors are then byte-swapped copies.
  bool big_endian() const noexcept { return big_endian_; }
  /// The archive's `version` record, e.g. "3".
  const std::string& archive_version() const noexcept { return version_; }

  /// The storage `index` of `state_dict().storages` as a 1-D CPU tensor of its dtype. Zero-copy
  /// over the file mapping when the record is stored uncompressed, aligned for its dtype and in
  /// this machine's byte order; otherwise copied once and kept, so that views stay shared.
  /// \code
  ///   at::Tensor s = ckpt->storage(ckpt->state_dict().tensors[0].storage);
  /// \endcode
  at::Tensor storage(std::size_t index) const {
    if (index >= contents_.storages.size())
      throw format_error({"loading a storage of", path(), error_position{"index", index}, "no such storage",
                          "pass an index below state_dict().storages.size()"});
    const std::lock_guard lock(mutex_);
    auto& cached = storage_cache_[index];
    if (!cached.defined()) cached = materialize(index);
    return cached;
  }

  /// True when storage `index` is served straight from the file mapping, without a copy: the
  /// record is stored uncompressed, aligned for its dtype and in this machine's byte order.
  /// \code
  ///   bool mapped = ckpt->zero_copy(0);   // true for every storage torch.save writes on x86/ARM
  /// \endcode
  bool zero_copy(std::size_t index) const {
    if (index >= locations_.size()) return false;
    const auto& s = contents_.storages[index];
    const auto& loc = locations_[index];
    return loc.entry.method == 0 && big_endian_ == (std::endian::native == std::endian::big) &&
           reinterpret_cast<std::uintptr_t>(file_->data() + loc.data_offset) % dtype_size(s.type) == 0;
  }

  /// The absolute file offset of storage `index`'s bytes when they are stored uncompressed
  /// (always, for torch.save), else nullopt.
  /// \code
  ///   if (auto at = ckpt->storage_file_offset(0)) std::cout << "data/0 at byte " << *at << '\n';
  /// \endcode
  std::optional<std::uint64_t> storage_file_offset(std::size_t index) const {
    if (index >= locations_.size() || locations_[index].entry.method != 0) return std::nullopt;
    return locations_[index].data_offset;
  }

  /// The tensor `name` as a CPU view of its storage (shape, stride and offset as saved).
  /// Throws `format_error` naming it when no tensor has that name.
  /// \code
  ///   at::Tensor bias = ckpt->tensor("fc.bias");
  /// \endcode
  at::Tensor tensor(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end())
      throw format_error({"loading a tensor from", path(), std::nullopt, "no tensor named '" + name + "'",
                          "list the names in state_dict().tensors; nested dicts are joined with '.'"});
    return tensor(contents_.tensors[it->second]);
  }

  /// The tensor a description entry names (an element of `state_dict().tensors`).
  /// \code
  ///   for (const auto& t : ckpt->state_dict().tensors) use(t.name, ckpt->tensor(t));
  /// \endcode
  at::Tensor tensor(const pickled_tensor& t) const {
    return storage(t.storage).as_strided(t.shape, t.stride, t.storage_offset);
  }

  /// Every tensor in file order; tensors saved as views of one storage are views of one tensor.
  /// \code
  ///   for (auto& [name, value] : ckpt->tensors()) module_params[name].copy_(value);
  /// \endcode
  std::vector<std::pair<std::string, at::Tensor>> tensors() const {
    std::vector<std::pair<std::string, at::Tensor>> out;
    out.reserve(contents_.tensors.size());
    for (const auto& t : contents_.tensors) out.emplace_back(t.name, tensor(t));
    return out;
  }

 private:
  struct record_location {
    detail::zip_entry entry;
    std::uint64_t data_offset = 0;
  };

  torch_zip_file(std::shared_ptr<const mapped_file> file, const pickle_limits& limits) : file_(std::move(file)) {
    reject_non_zip();
    directory_ = detail::read_zip_directory(file_->bytes(), path());
    archive_prefix_ = find_archive_prefix();
    check_version_record();
    try {
      reader_ = std::make_unique<caffe2::serialize::PyTorchStreamReader>(
          std::make_shared<detail::mapped_read_adapter>(file_));
    } catch (const std::exception& e) {  // c10::Error, and std::invalid_argument from a bad version
      const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
      throw format_error({"opening zip archive", path(), std::nullopt,
                          c10_error != nullptr ? c10_error->what_without_backtrace() : e.what(),
                          "copy or download the checkpoint again; the archive is damaged"});
    }
    if (version_.empty()) version_ = std::to_string(reader_->version());
    if (has_record("byteorder")) {
      const std::string order = read_small_record("byteorder");
      if (order != "little" && order != "big")
        throw format_error({"reading the byteorder record of", path(), std::nullopt,
                            "byteorder is '" + order.substr(0, 32) + "', not 'little' or 'big'",
                            "re-save the checkpoint with torch.save"});
      big_endian_ = order == "big";
    }
    if (!has_record("data.pkl"))
      throw format_error({"opening", path(), std::nullopt, "the archive has no data.pkl record (a TorchScript archive?)",
                          "save a state dict with torch.save(model.state_dict(), path)"});
    const std::string pickle = read_record_bytes("data.pkl", limits.max_input_bytes);
    contents_ = unpickle_state_dict(std::as_bytes(std::span(pickle.data(), pickle.size())), path() + ":data.pkl", limits);
    for (std::size_t i = 0; i < contents_.tensors.size(); ++i) index_.emplace(contents_.tensors[i].name, i);
    locations_.reserve(contents_.storages.size());
    for (const auto& s : contents_.storages) locations_.push_back(locate_storage(s));
    storage_cache_.resize(contents_.storages.size());
  }

  void reject_non_zip() const {
    const auto b = file_->bytes();
    auto at = [&](std::size_t i) { return i < b.size() ? static_cast<std::uint8_t>(b[i]) : 0u; };
    if (b.size() >= 4 && at(0) == 'P' && at(1) == 'K' && at(2) == 3 && at(3) == 4) return;
    if (at(0) == 0x80 && at(1) >= 2 && at(1) <= 5) {
      // The legacy format begins with a pickled magic number: LONG1 of 0x1950a86a20f9469cfc6c.
      static constexpr std::uint8_t magic[] = {0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
      bool legacy = b.size() >= 2 + sizeof magic;
      for (std::size_t i = 0; legacy && i < sizeof magic; ++i) legacy = at(2 + i) == magic[i];
      throw format_error({"opening", path(), error_position{"offset", 0},
                          legacy ? "this is the legacy torch.save format (a stream of pickles, not a zip archive), "
                                   "which distorch does not read"
                                 : "this is a bare pickle, not a PyTorch zip checkpoint",
                          detail::torch_zip_convert_fix});
    }
    throw format_error({"opening", path(), error_position{"offset", 0},
                        "not a PyTorch zip checkpoint (the file does not start with a zip local header)",
                        "pass a file written by torch.save; for the legacy format, " + detail::torch_zip_convert_fix});
  }

  // PyTorchStreamReader names records without the archive's top folder ("archive/", "model/"),
  // which it takes from the first directory entry; so do we.
  std::string find_archive_prefix() const {
    const std::string& first = directory_.first_name;
    const auto slash = first.find('/');
    if (slash == std::string::npos)
      throw format_error({"opening", path(), std::nullopt,
                          "the first record '" + first.substr(0, 64) + "' is not inside an archive folder",
                          "pass a file written by torch.save"});
    return first.substr(0, slash + 1);
  }

  // Checks beforehand what PyTorchStreamReader's constructor checks after opening the archive:
  // its constructor leaks miniz's state when it throws, so it should only see archives that pass.
  void check_version_record() {
    const std::string names[] = {archive_prefix_ + ".data/version", archive_prefix_ + "version"};
    const detail::zip_entry* entry = nullptr;
    for (const auto& n : names) {
      const auto it = directory_.entries.find(n);
      if (it != directory_.entries.end()) {
        entry = &it->second;
        break;
      }
    }
    auto bad = [&](const std::string& problem) {
      return format_error({"reading the version record of", path(), std::nullopt, problem,
                           "pass a file written by torch.save; copy it again if it was"});
    };
    if (entry == nullptr) throw bad("the archive has no version record");
    if ((entry->flags & 1) != 0) throw bad("it is encrypted");
    if (entry->directory) throw bad("it is marked as a directory");
    if (entry->method != 0 && entry->method != 8) throw bad("its compression method is unknown");
    const auto b = file_->bytes();
    const std::uint64_t h = entry->local_header_offset;
    if (h > b.size() || b.size() - h < 30 || detail::zip_le(b, h, 4) != 0x04034b50) throw bad("its header is damaged");
    const std::uint64_t data = h + 30 + detail::zip_le(b, h + 26, 2) + detail::zip_le(b, h + 28, 2);
    if (entry->compressed_size > 64 || data > b.size() || b.size() - data < entry->compressed_size)
      throw bad("it is damaged");
    // A deflated record (never written by torch.save) is inflated and checked by LibTorch.
    if (entry->method != 0) return;
    if (entry->uncompressed_size != entry->compressed_size) throw bad("its sizes disagree");
    const auto bytes = b.subspan(data, entry->compressed_size);
    if (detail::zip_crc32(bytes) != entry->crc32) throw bad("its checksum does not match");
    std::string text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.pop_back();
    if (text.empty() || text.size() > 18 || text.find_first_not_of("0123456789") != std::string::npos)
      throw bad("'" + text.substr(0, 32) + "' is not a version number");
    const std::uint64_t version = std::stoull(text);
    if (version < caffe2::serialize::kMinSupportedFileFormatVersion ||
        version > caffe2::serialize::kMaxSupportedFileFormatVersion)
      throw bad("archive version " + text + " is outside what this LibTorch reads (" +
                std::to_string(caffe2::serialize::kMinSupportedFileFormatVersion) + " to " +
                std::to_string(caffe2::serialize::kMaxSupportedFileFormatVersion) + ")");
    version_ = text;
  }

  bool has_record(const std::string& name) const {
    try {
      return reader_->hasRecord(name) && directory_.entries.count(archive_prefix_ + name) != 0;
    } catch (const c10::Error&) {
      return false;
    }
  }

  record_location locate(const std::string& name) const {
    const auto it = directory_.entries.find(archive_prefix_ + name);
    if (it == directory_.entries.end() || !has_record(name))
      throw format_error({"opening", path(), std::nullopt, "the archive has no record '" + name + "'",
                          "copy or download the checkpoint again; the archive is incomplete"});
    record_location loc{it->second, 0};
    try {
      loc.data_offset = reader_->getRecordOffset(name);
    } catch (const c10::Error& e) {
      throw format_error({"locating record '" + name + "' in", path(), std::nullopt, e.what_without_backtrace(),
                          "copy or download the checkpoint again; the archive is damaged"});
    }
    const auto b = file_->bytes();
    const std::uint64_t h = loc.entry.local_header_offset;
    // The data must start right after its own local header, and lie wholly inside the file.
    const bool header_ok = h <= b.size() && b.size() - h >= 30 && detail::zip_le(b, h, 4) == 0x04034b50 &&
                           h + 30 + detail::zip_le(b, h + 26, 2) + detail::zip_le(b, h + 28, 2) == loc.data_offset;
    if (!header_ok || loc.data_offset > b.size() || b.size() - loc.data_offset < loc.entry.compressed_size)
      throw format_error({"locating record '" + name + "' in", path(), error_position{"offset", h},
                          "the record's header and data do not lie where the directory says",
                          "copy or download the checkpoint again; the archive is damaged"});
    if ((loc.entry.flags & 1) != 0 || loc.entry.directory)
      throw format_error({"locating record '" + name + "' in", path(), error_position{"offset", h},
                          (loc.entry.flags & 1) != 0 ? "the record is encrypted" : "the record is marked as a directory",
                          "re-save the checkpoint with torch.save"});
    if (loc.entry.method != 0 && loc.entry.method != 8)
      throw format_error({"locating record '" + name + "' in", path(), error_position{"offset", h},
                          "compression method " + std::to_string(loc.entry.method) + " is not supported",
                          "re-save the checkpoint with torch.save, which stores records uncompressed"});
    // Deflate expands at most ~1032:1; a larger claim is a lie that would make us allocate it.
    if (loc.entry.method == 0 ? loc.entry.uncompressed_size != loc.entry.compressed_size
                              : loc.entry.uncompressed_size / 1032 > loc.entry.compressed_size + 1)
      throw format_error({"locating record '" + name + "' in", path(), error_position{"offset", h},
                          "the record claims " + std::to_string(loc.entry.uncompressed_size) + " bytes from " +
                              std::to_string(loc.entry.compressed_size) + " stored bytes",
                          "copy or download the checkpoint again; the archive is damaged"});
    return loc;
  }

  // Bytes of a record, checked against `limit` before anything is allocated.
  std::string read_record_bytes(const std::string& name, std::uint64_t limit) const {
    const record_location loc = locate(name);
    if (loc.entry.uncompressed_size > limit)
      throw format_error({"reading record '" + name + "' of", path(), error_position{"offset", loc.data_offset},
                          "the record is " + std::to_string(loc.entry.uncompressed_size) + " bytes, over the limit of " +
                              std::to_string(limit),
                          "raise pickle_limits::max_input_bytes if this checkpoint is trusted"});
    std::string out;
    if (loc.entry.method == 0) {
      out.assign(reinterpret_cast<const char*>(file_->data() + loc.data_offset), loc.entry.uncompressed_size);
    } else {
      try {
        auto [data, size] = reader_->getRecord(name);
        out.assign(static_cast<const char*>(data.get()), std::min<std::uint64_t>(size, loc.entry.uncompressed_size));
      } catch (const c10::Error& e) {
        throw format_error({"decompressing record '" + name + "' of", path(), error_position{"offset", loc.data_offset},
                            e.what_without_backtrace(), "copy or download the checkpoint again; the archive is damaged"});
      }
    }
    check_crc(name, loc, std::as_bytes(std::span(out.data(), out.size())));
    return out;
  }

  // Small records are checked in full. Storages only when they are inflated: LibTorch's miniz
  // can report success for a damaged deflate stream, and mapped storages are never read here.
  void check_crc(const std::string& name, const record_location& loc, std::span<const std::byte> bytes) const {
    if (bytes.size() != loc.entry.uncompressed_size || detail::zip_crc32(bytes) != loc.entry.crc32)
      throw format_error({"checking record '" + name + "' of", path(), error_position{"offset", loc.data_offset},
                          "its contents do not match the checksum in the zip directory",
                          "copy or download the checkpoint again; the archive is damaged"});
  }

  std::string read_small_record(const std::string& name) const { return read_record_bytes(name, 4096); }

  record_location locate_storage(const pickled_storage& s) const {
    record_location loc = locate("data/" + s.key);
    if (loc.entry.uncompressed_size != s.nbytes())
      throw format_error({"checking storage record 'data/" + s.key + "' of", path(),
                          error_position{"offset", loc.data_offset},
                          "the record holds " + std::to_string(loc.entry.uncompressed_size) + " bytes but data.pkl describes " +
                              std::to_string(s.numel) + " " + std::string(dtype_name(s.type)) + " elements (" +
                              std::to_string(s.nbytes()) + " bytes)",
                          "copy or download the checkpoint again; the archive is damaged"});
    return loc;
  }

  at::Tensor materialize(std::size_t index) const {
    const auto& s = contents_.storages[index];
    const auto& loc = locations_[index];
    const auto options = at::TensorOptions().dtype(to_scalar_type(s.type)).device(at::kCPU);
    const auto numel = static_cast<std::int64_t>(s.numel);
    const std::size_t element = dtype_size(s.type);
    const bool swap = big_endian_ != (std::endian::native == std::endian::big);
    const std::byte* stored = file_->data() + loc.data_offset;
    at::Tensor out;
    if (zero_copy(index)) {
      // Zero-copy: the deleter keeps the mapping alive as long as any view of this storage.
      auto keep = file_;
      out = at::from_blob(const_cast<std::byte*>(stored), {numel}, [keep](void*) {}, options);
    } else if (loc.entry.method == 0) {
      out = at::empty({numel}, options);
      if (s.nbytes() > 0) std::memcpy(out.data_ptr(), stored, s.nbytes());
    } else {
      try {
        auto [data, size] = reader_->getRecord("data/" + s.key);
        if (size != s.nbytes())
          throw format_error({"decompressing storage 'data/" + s.key + "' of", path(), std::nullopt,
                              "it inflated to " + std::to_string(size) + " bytes, not " + std::to_string(s.nbytes()),
                              "copy or download the checkpoint again; the archive is damaged"});
        check_crc("data/" + s.key, loc, std::span(static_cast<const std::byte*>(data.get()), size));
        // LibTorch's buffer (64-byte aligned) becomes the storage: no second copy.
        auto buffer = std::make_shared<at::DataPtr>(std::move(data));
        out = at::from_blob(buffer->get(), {numel}, [buffer](void*) {}, options);
      } catch (const c10::Error& e) {
        throw format_error({"decompressing storage 'data/" + s.key + "' of", path(), std::nullopt,
                            e.what_without_backtrace(), "copy or download the checkpoint again; the archive is damaged"});
      }
    }
    if (swap && out.numel() > 0) detail::byteswap_elements(static_cast<std::byte*>(out.data_ptr()), s.numel, element);
    if (s.type == dtype::boolean) check_booleans(s, out);
    return out;
  }

  // A bool byte other than 0 or 1 is undefined behaviour in LibTorch's kernels.
  void check_booleans(const pickled_storage& s, const at::Tensor& t) const {
    const auto* p = static_cast<const std::uint8_t*>(t.data_ptr());
    for (std::uint64_t i = 0; i < s.numel; ++i)
      if (p[i] > 1)
        throw format_error({"checking bool storage 'data/" + s.key + "' of", path(), error_position{"element", i},
                            "byte value " + std::to_string(p[i]) + " is neither 0 nor 1",
                            "copy or download the checkpoint again; the data is damaged"});
  }

  std::shared_ptr<const mapped_file> file_;
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader_;
  detail::zip_directory directory_;
  std::string archive_prefix_;
  std::string version_;
  bool big_endian_ = false;
  pickled_state_dict contents_;
  std::unordered_map<std::string, std::size_t> index_;
  std::vector<record_location> locations_;
  mutable std::mutex mutex_;
  mutable std::vector<at::Tensor> storage_cache_;
};

}  // namespace distorch::inline v0
