#pragma once
/// Exception types thrown by qrloss.

#include <stdexcept>
#include <string>

namespace qrloss {

/// Caller error: bad shape, bad eps, null or overlapping buffers, or
/// non-finite or negative values in probs, target or logits.
/// Messages read `<function>: <problem>: <details>`.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace qrloss
