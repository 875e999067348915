#pragma once
// Headers that every kernel variant needs and that must be parsed before a
// `#pragma GCC target` region opens. Instances of the standard library and
// of Eigen then carry the build's baseline flags in every variant, so any
// copy the linker picks runs on any machine.

#include <immintrin.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/passes.hpp"
#include "detail/workspace.hpp"
#include "qrloss/error.hpp"
#include "qrloss/losses.hpp"
#include "qrloss/tensor.hpp"
