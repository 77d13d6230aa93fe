#pragma once
/// \file
/// `device_id` ↔ `c10::Device`. Simulated devices (`sim:N`) are backed by host memory, so they map
/// to the CPU. `npu` and `mlu` have no `c10::DeviceType` of their own in LibTorch 1.13: their
/// out-of-tree backends (torch_npu, torch_mlu) register as `PrivateUse1`, so that is where they map.
/// Only `<c10/core/Device.h>` is included: this header costs well under a second.
///
/// Example:
/// \code
///   c10::Device d = distorch::to_torch_device(distorch::device_id::parse("cuda:1"));   // cuda:1
///   c10::Device s = distorch::to_torch_device(distorch::device_id::sim(3));            // cpu
///   distorch::device_id back = distorch::from_torch_device(c10::Device(c10::kCUDA, 1)); // cuda:1
/// \endcode

#include <limits>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>

#include "distorch/core/error.hpp"
#include "distorch/device/device_id.hpp"

namespace distorch::inline v0 {

/// The `c10::DeviceType` a device kind runs on. `sim` runs on the CPU.
/// \code auto t = distorch::torch_device_type(distorch::device_kind::xpu);   // c10::kXPU \endcode
constexpr c10::DeviceType torch_device_type(device_kind kind) noexcept {
  switch (kind) {
    case device_kind::cpu: return c10::DeviceType::CPU;
    case device_kind::sim: return c10::DeviceType::CPU;
    case device_kind::cuda: return c10::DeviceType::CUDA;
    case device_kind::mps: return c10::DeviceType::MPS;
    case device_kind::xpu: return c10::DeviceType::XPU;
    case device_kind::npu: return c10::DeviceType::PrivateUse1;
    case device_kind::mlu: return c10::DeviceType::PrivateUse1;
  }
  return c10::DeviceType::CPU;
}

/// The LibTorch device a distorch device computes on. `sim:N` and `cpu` give `cpu`; `mps` gives
/// `mps` (no index). Throws `device_error` when the index does not fit LibTorch's device index
/// type (int8 in 1.13).
/// \code
///   at::Tensor t = at::empty({4}, at::TensorOptions().device(distorch::to_torch_device(id)));
/// \endcode
inline c10::Device to_torch_device(const device_id& id) {
  const c10::DeviceType type = torch_device_type(id.kind);
  if (type == c10::DeviceType::CPU || id.index < 0) return c10::Device(type);
  if (id.index > std::numeric_limits<c10::DeviceIndex>::max())
    throw device_error({"mapping device to LibTorch", id.str(), std::nullopt,
                        "device index " + std::to_string(id.index) + " exceeds LibTorch's largest device index " +
                            std::to_string(static_cast<int>(std::numeric_limits<c10::DeviceIndex>::max())),
                        "use a device index that LibTorch can address"});
  return c10::Device(type, static_cast<c10::DeviceIndex>(id.index));
}

/// The distorch name of a real LibTorch device. A CUDA/XPU/PrivateUse1 device without an index
/// means the current one, taken here as index 0. `PrivateUse1` is ambiguous (torch_npu and
/// torch_mlu both use it), so the caller says which kind it is; the default is `npu`. Throws
/// `device_error` for device types distorch does not place onto (meta, XLA, Vulkan, ...).
/// \code
///   auto id = distorch::from_torch_device(tensor.device());   // "cuda:0", "cpu", ...
/// \endcode
inline device_id from_torch_device(const c10::Device& device, device_kind private_use1_kind = device_kind::npu) {
  const int index = device.has_index() ? static_cast<int>(device.index()) : 0;
  switch (device.type()) {
    case c10::DeviceType::CPU: return device_id::cpu();
    case c10::DeviceType::CUDA: return {device_kind::cuda, index};
    case c10::DeviceType::MPS: return {device_kind::mps, -1};
    case c10::DeviceType::XPU: return {device_kind::xpu, index};
    case c10::DeviceType::PrivateUse1:
      if (private_use1_kind == device_kind::npu || private_use1_kind == device_kind::mlu) return {private_use1_kind, index};
      throw device_error({"mapping LibTorch device to a distorch device", device.str(), std::nullopt,
                          "PrivateUse1 can only be named npu or mlu, not " + std::string(kind_name(private_use1_kind)),
                          "pass device_kind::npu or device_kind::mlu"});
    default: break;
  }
  throw device_error({"mapping LibTorch device to a distorch device", device.str(), std::nullopt,
                      "distorch does not place weights on this device type",
                      "use cpu, cuda, mps, xpu or a PrivateUse1 backend (npu, mlu)"});
}

}  // namespace distorch::inline v0
