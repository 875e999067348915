#pragma once
/// Umbrella header of qrloss: QR and RQ losses, their analytic gradients,
/// the softmax chain and a numeric gradient checker.

#include "qrloss/error.hpp"
#include "qrloss/gradcheck.hpp"
#include "qrloss/losses.hpp"
#include "qrloss/softmax.hpp"
#include "qrloss/tensor.hpp"
#include "qrloss/validate.hpp"
