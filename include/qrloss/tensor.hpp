#pragma once
/// Shapes and tensor views shared by every qrloss entry point.

#include <cstdint>
#include <string>
#include <type_traits>
#include <unsupported/Eigen/CXX11/Tensor>
#include <vector>

namespace qrloss {

/// Extents of a probs, target, logits or gradient tensor: rank 2 (B, C) or
/// rank 4 (B, C, H, W), row-major with W fastest. (B, C) is the same as
/// (B, C, 1, 1).
using Shape = std::vector<std::int64_t>;

/// Read-only view of a caller's row-major buffer.
template <typename T, int Rank>
using ConstTensorView =
    Eigen::TensorMap<const Eigen::Tensor<T, Rank, Eigen::RowMajor>>;

/// Writable view of a caller's row-major buffer.
template <typename T, int Rank>
using TensorView = Eigen::TensorMap<Eigen::Tensor<T, Rank, Eigen::RowMajor>>;

/// Formats a shape as `[2,19,64,64]`, the form used in error messages.
std::string format_shape(const Shape& shape);

namespace detail {

/// T in a parameter that takes no part in template argument deduction, so
/// that a literal nullptr can stand for an optional T* output.
template <typename T>
struct NonDeducedImpl {
  using type = T;
};
template <typename T>
using NonDeduced = typename NonDeducedImpl<T>::type;

/// True for Eigen::TensorMap types over row-major tensors of rank 2 or 4.
template <typename Map, typename = void>
struct is_loss_tensor_map : std::false_type {};

template <typename Map>
struct is_loss_tensor_map<
    Map, std::void_t<typename Map::Scalar, decltype(Map::NumDimensions),
                     decltype(std::declval<const Map&>().data())>>
    : std::bool_constant<(Map::NumDimensions == 2 || Map::NumDimensions == 4) &&
                         (static_cast<int>(Map::Layout) ==
                          static_cast<int>(Eigen::RowMajor))> {};

/// Shape of a TensorMap as a qrloss::Shape.
template <typename Map>
Shape shape_of(const Map& map) {
  Shape shape;
  for (int d = 0; d < Map::NumDimensions; ++d) {
    shape.push_back(static_cast<std::int64_t>(map.dimension(d)));
  }
  return shape;
}

}  // namespace detail
}  // namespace qrloss
