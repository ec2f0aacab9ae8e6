// Built-in losses of the spherical family: each is a function of, per example j, the outputs A at the target
// indices, q = ||o||^2 and s = sum(o). For multi-label targets with values y the probabilistic losses are
// L = -sum_k y_k log p_k (Z-loss: sum_k y_k l(z_k)); squared error is ||o - y||^2.
#pragma once

#include <cstdint>
#include <string>

#include "state.h"

namespace sparsetarget {

enum class LossKind { SquaredError, SphericalSoftmax, TaylorSoftmax, ZLoss };

struct LossSpec {
  LossKind kind = LossKind::SquaredError;
  double eps = 1e-2;  // spherical softmax: p_k = (o_k^2 + eps) / (q + D eps), eps > 0
  double a = 0.1;     // Z-loss sharpness, a > 0
  double b = 10.0;    // Z-loss location
};

// Parses a loss name and checks its options; throws std::invalid_argument naming the bad option.
LossSpec make_loss_spec(const std::string& name, double eps, double a, double b);

// Per-example loss and its partial derivatives dL/dA (one per target entry), dL/dq, dL/ds.
// Rows with active[j] == 0 (ignored) get loss 0 and zero derivatives; active may be null (all active).
// Throws std::domain_error when the loss is undefined at these outputs (Z-loss with zero variance).
template <class T>
void evaluate_loss(const LossSpec& spec, std::int64_t D, const Targets& targets, const std::uint8_t* active,
                   const T* A, const T* q, const T* s, double* loss, T* dA, T* dq, T* ds);

}  // namespace sparsetarget
