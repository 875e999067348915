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

/// True for Eigen tensor types that expose their data: TensorMap (and
/// Tensor) of any layout, rank and scalar. The loss overloads take these,
/// so that LossMapCheck can reject a wrong one with a readable message
/// instead of a failed overload resolution.
template <typename Map, typename = void>
struct is_tensor_map : std::false_type {};

template <typename Map>
struct is_tensor_map<
    Map, std::void_t<typename Map::Scalar, decltype(Map::NumDimensions),
                     decltype(Map::Layout),
                     decltype(std::declval<const Map&>().data())>>
    : std::true_type {};

/// Stops compilation unless every map is row-major, of rank 2 or 4, over
/// float or double, and all hold the same scalar type. `value` is true for
/// such maps. A class template is instantiated where ::value is named, so
/// its static_assert message comes first. The loss overloads skip their
/// pointer call where value is false, because that call would add a failed
/// overload resolution to the errors.
template <typename First, typename... Rest>
struct LossMapCheck {
  using Scalar = std::remove_const_t<typename First::Scalar>;
  static constexpr bool kFloating =
      std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>;
  static constexpr bool kSameScalar =
      (std::is_same_v<std::remove_const_t<typename Rest::Scalar>, Scalar> &&
       ...);
  static constexpr bool kRank =
      ((First::NumDimensions == 2 || First::NumDimensions == 4) && ... &&
       (Rest::NumDimensions == 2 || Rest::NumDimensions == 4));
  static constexpr bool kRowMajor =
      ((static_cast<int>(First::Layout) == static_cast<int>(Eigen::RowMajor)) &&
       ... &&
       (static_cast<int>(Rest::Layout) == static_cast<int>(Eigen::RowMajor)));
  static_assert(kFloating, "qrloss: tensor maps must hold float or double");
  static_assert(kSameScalar,
                "qrloss: all tensor maps of a call must hold the same scalar "
                "type");
  static_assert(kRank,
                "qrloss: tensor maps must have rank 2 (B,C) or 4 (B,C,H,W)");
  static_assert(kRowMajor,
                "qrloss: tensor maps must be Eigen::RowMajor (W fastest), as "
                "qrloss::TensorView is");
  static constexpr bool value = kFloating && kSameScalar && kRank && kRowMajor;
};

/// True for Eigen::TensorMap types only, not for Eigen::Tensor.
template <typename Map>
struct is_eigen_tensor_map : std::false_type {};

template <typename Plain, int Options, template <class> class MakePointer>
struct is_eigen_tensor_map<Eigen::TensorMap<Plain, Options, MakePointer>>
    : std::true_type {};

/// Stops compilation unless the gradient argument is a writable
/// Eigen::TensorMap. It is taken by value, so an Eigen::Tensor would be
/// copied and the gradient written into the copy, and a map of const
/// scalars cannot be written.
template <typename GradMap>
struct GradMapCheck {
  static constexpr bool kMap = is_eigen_tensor_map<GradMap>::value;
  static constexpr bool kWritable = !std::is_const_v<std::remove_pointer_t<
      decltype(std::declval<GradMap&>().data())>>;
  static_assert(kMap,
                "qrloss: the gradient must be an Eigen::TensorMap over your "
                "buffer (such as qrloss::TensorView); an Eigen::Tensor is "
                "taken by value, so the gradient would be lost");
  static_assert(kWritable,
                "qrloss: the gradient map must be writable, not a map of "
                "const scalars");
  static constexpr bool value = kMap && kWritable;
};

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
