#pragma once
/// \file
/// One-line aliases: every LibTorch layer with parameters, as a `ModuleHolder` of
/// `distorch::nn::Streamed<torch::nn::XImpl>`. A model written with them streams with no change to
/// its forward; unattached, they behave as the LibTorch layers they alias.
///
/// `distorch::nn` is a complete drop-in for `torch::nn`: every other name (containers such as
/// `Sequential`, `ModuleList`, `ModuleDict`; parameter-free layers such as `ReLU`, `Dropout`,
/// `Flatten`; options such as `LinearOptions`; `Module`, `ModuleHolder`, `AnyModule`, `functional`,
/// `init`) is LibTorch's own, found through a using-directive. So a model file switches with
/// `namespace nn = distorch::nn;` where it had `namespace nn = torch::nn;`, or by replacing
/// `torch::nn::` with `distorch::nn::`, and nothing else.
///
/// Layers whose forward has default arguments (ConvTranspose*, EmbeddingBag, MultiheadAttention,
/// RNN/LSTM/GRU and their cells, Transformer*) take every argument when called directly;
/// `Sequential` / `AnyModule` fill the defaults in as before.
///
/// Example:
/// \code
///   struct BlockImpl : torch::nn::Module {
///     distorch::nn::LayerNorm norm{register_module("norm", distorch::nn::LayerNorm(torch::nn::LayerNormOptions({64})))};
///     distorch::nn::Linear fc{register_module("fc", distorch::nn::Linear(64, 64))};
///     at::Tensor forward(const at::Tensor& x) { return x + fc(norm(x)); }
///   };
/// \endcode

// modules/instancenorm.h uses functional::detail::instance_norm without including it (1.13).
#include <torch/nn/functional/instancenorm.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/adaptive.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/instancenorm.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/rnn.h>
#include <torch/nn/modules/transformer.h>
#include <torch/nn/modules/transformercoder.h>
#include <torch/nn/modules/transformerlayer.h>

#include "distorch/runtime/detail/norm_print.hpp"
#include "distorch/runtime/streamed.hpp"

#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/parameterdict.h>
#include <torch/nn/modules/container/parameterlist.h>
#include <torch/nn/modules/container/sequential.h>

namespace distorch::inline v0 {
namespace nn {

// Every torch::nn name this namespace does not declare itself (qualified lookup of
// distorch::nn::X finds the streamed alias first, and LibTorch's X only where there is none).
/// \code
///   namespace nn = distorch::nn;
///   nn::Sequential mlp(nn::Linear(8, 16), nn::ReLU(), nn::Dropout(0.1), nn::Linear(16, 8));
/// \endcode
using namespace torch::nn;

// Each alias below, e.g. `distorch::nn::Linear`, is the LibTorch layer of the same name made to
// stream. One line each, so the list cannot drift from what `Streamed<Impl>` supports.
/// \code
///   distorch::nn::Conv2d conv(torch::nn::Conv2dOptions(3, 8, 3).padding(1));
///   at::Tensor y = conv(x);   // stages conv's unit when attached to a DistributedModule
/// \endcode
#define DISTORCH_STREAMED_LAYER(Name) using Name = streamed_holder<torch::nn::Name##Impl>

DISTORCH_STREAMED_LAYER(Linear);
DISTORCH_STREAMED_LAYER(Bilinear);
DISTORCH_STREAMED_LAYER(Conv1d);
DISTORCH_STREAMED_LAYER(Conv2d);
DISTORCH_STREAMED_LAYER(Conv3d);
DISTORCH_STREAMED_LAYER(ConvTranspose1d);
DISTORCH_STREAMED_LAYER(ConvTranspose2d);
DISTORCH_STREAMED_LAYER(ConvTranspose3d);
DISTORCH_STREAMED_LAYER(Embedding);
DISTORCH_STREAMED_LAYER(EmbeddingBag);
DISTORCH_STREAMED_LAYER(LayerNorm);
DISTORCH_STREAMED_LAYER(GroupNorm);
DISTORCH_STREAMED_LAYER(BatchNorm1d);
DISTORCH_STREAMED_LAYER(BatchNorm2d);
DISTORCH_STREAMED_LAYER(BatchNorm3d);
DISTORCH_STREAMED_LAYER(InstanceNorm1d);
DISTORCH_STREAMED_LAYER(InstanceNorm2d);
DISTORCH_STREAMED_LAYER(InstanceNorm3d);
DISTORCH_STREAMED_LAYER(PReLU);
DISTORCH_STREAMED_LAYER(MultiheadAttention);
DISTORCH_STREAMED_LAYER(RNN);
DISTORCH_STREAMED_LAYER(LSTM);
DISTORCH_STREAMED_LAYER(GRU);
DISTORCH_STREAMED_LAYER(RNNCell);
DISTORCH_STREAMED_LAYER(LSTMCell);
DISTORCH_STREAMED_LAYER(GRUCell);
DISTORCH_STREAMED_LAYER(TransformerEncoderLayer);
DISTORCH_STREAMED_LAYER(TransformerDecoderLayer);
DISTORCH_STREAMED_LAYER(TransformerEncoder);
DISTORCH_STREAMED_LAYER(TransformerDecoder);
DISTORCH_STREAMED_LAYER(Transformer);
DISTORCH_STREAMED_LAYER(AdaptiveLogSoftmaxWithLoss);

#undef DISTORCH_STREAMED_LAYER

}  // namespace nn
}  // namespace distorch::inline v0
