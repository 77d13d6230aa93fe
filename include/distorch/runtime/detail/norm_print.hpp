#pragma once
/// \file
/// Internal. LibTorch 1.13 declares `pretty_print` of the batch- and instance-norm base templates
/// in its headers but defines it in a source file, and Debian's libtorch does not export those
/// instantiations. Plain `torch::nn::BatchNorm2d` never notices (its vtable lives in libtorch), but
/// any class deriving from `BatchNorm2dImpl` (as `Streamed<BatchNorm2dImpl>` does) emits
/// construction vtables that need the symbol. These definitions print what LibTorch prints; a
/// build whose LibTorch exports them can turn them off with `-DDISTORCH_DEFINE_NORM_PRINT=0`.

#include <ostream>

#include <torch/csrc/api/include/torch/version.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/instancenorm.h>

#ifndef DISTORCH_DEFINE_NORM_PRINT
#if TORCH_VERSION_MAJOR < 2
#define DISTORCH_DEFINE_NORM_PRINT 1
#else
#define DISTORCH_DEFINE_NORM_PRINT 0
#endif
#endif

#if DISTORCH_DEFINE_NORM_PRINT
namespace torch::nn {

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::pretty_print(std::ostream& stream) const {
  stream << std::boolalpha << "torch::nn::BatchNorm" << D << "d(" << this->options.num_features() << ", "
         << "eps=" << this->options.eps() << ", momentum=";
  if (this->options.momentum()) stream << *this->options.momentum();
  else stream << "None";
  stream << ", affine=" << this->options.affine() << ", track_running_stats=" << this->options.track_running_stats() << ")";
}

template <size_t D, typename Derived>
void InstanceNormImpl<D, Derived>::pretty_print(std::ostream& stream) const {
  stream << std::boolalpha << "torch::nn::InstanceNorm" << D << "d(" << this->options.num_features() << ", "
         << "eps=" << this->options.eps() << ", momentum=" << this->options.momentum()
         << ", affine=" << this->options.affine() << ", track_running_stats=" << this->options.track_running_stats() << ")";
}

}  // namespace torch::nn
#endif
