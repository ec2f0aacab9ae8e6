#include "losses.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>
#include <vector>

namespace sparsetarget {

LossSpec make_loss_spec(const std::string& name, double eps, double a, double b) {
  LossSpec spec;
  spec.eps = eps;
  spec.a = a;
  spec.b = b;
  if (name == "squared_error") {
    spec.kind = LossKind::SquaredError;
  } else if (name == "spherical_softmax") {
    spec.kind = LossKind::SphericalSoftmax;
    if (!(eps > 0) || !std::isfinite(eps)) throw std::invalid_argument("eps must be finite and > 0 for spherical_softmax");
  } else if (name == "taylor_softmax") {
    spec.kind = LossKind::TaylorSoftmax;
  } else if (name == "z_loss") {
    spec.kind = LossKind::ZLoss;
    if (!(a > 0) || !std::isfinite(a)) throw std::invalid_argument("a must be finite and > 0 for z_loss");
    if (!std::isfinite(b)) throw std::invalid_argument("b must be finite for z_loss");
  } else {
    throw std::invalid_argument("loss must be one of squared_error, spherical_softmax, taylor_softmax, z_loss; got '" +
                                name + "'");
  }
  return spec;
}

namespace {

double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); }
double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

// ||y||^2 for one CSR row, summing duplicate indices first.
double target_sq_norm(const Targets& t, std::int64_t row, std::vector<std::pair<std::int64_t, double>>& scratch) {
  scratch.clear();
  for (std::int64_t e = t.indptr[row]; e < t.indptr[row + 1]; ++e) scratch.emplace_back(t.indices[e], t.values[e]);
  std::sort(scratch.begin(), scratch.end());
  double total = 0, run = 0;
  for (std::size_t i = 0; i < scratch.size(); ++i) {
    run += scratch[i].second;
    if (i + 1 == scratch.size() || scratch[i + 1].first != scratch[i].first) {
      total += run * run;
      run = 0;
    }
  }
  return total;
}

}  // namespace

template <class T>
void evaluate_loss(const LossSpec& spec, std::int64_t D, const Targets& t, const std::uint8_t* active, const T* A,
                   const T* q, const T* s, double* loss, T* dA, T* dq, T* ds) {
  const double Dd = static_cast<double>(D);
  std::vector<std::pair<std::int64_t, double>> scratch;
  for (std::int64_t j = 0; j < t.m; ++j) {
    const std::int64_t begin = t.indptr[j], end = t.indptr[j + 1];
    if (active && !active[j]) {
      loss[j] = 0;
      dq[j] = ds[j] = T(0);
      for (std::int64_t e = begin; e < end; ++e) dA[e] = T(0);
      continue;
    }
    const double qj = q[j], sj = s[j];
    double y_total = 0;
    for (std::int64_t e = begin; e < end; ++e) y_total += t.values[e];
    double L = 0, gq = 0, gs = 0;
    switch (spec.kind) {
      case LossKind::SquaredError: {  // ||o||^2 - 2 y.o + ||y||^2
        L = qj + target_sq_norm(t, j, scratch);
        for (std::int64_t e = begin; e < end; ++e) {
          L -= 2 * t.values[e] * static_cast<double>(A[e]);
          dA[e] = static_cast<T>(-2 * t.values[e]);
        }
        gq = 1;
        break;
      }
      case LossKind::SphericalSoftmax: {  // p_k = (o_k^2 + eps) / (q + D eps)
        const double norm = qj + Dd * spec.eps;
        L = y_total * std::log(norm);
        for (std::int64_t e = begin; e < end; ++e) {
          const double a = A[e], num = a * a + spec.eps;
          L -= t.values[e] * std::log(num);
          dA[e] = static_cast<T>(-t.values[e] * 2 * a / num);
        }
        gq = y_total / norm;
        break;
      }
      case LossKind::TaylorSoftmax: {  // p_k = (1 + o_k + o_k^2/2) / (D + s + q/2)
        const double norm = Dd + sj + 0.5 * qj;
        L = y_total * std::log(norm);
        for (std::int64_t e = begin; e < end; ++e) {
          const double a = A[e], num = 1 + a + 0.5 * a * a;
          L -= t.values[e] * std::log(num);
          dA[e] = static_cast<T>(-t.values[e] * (1 + a) / num);
        }
        gq = 0.5 * y_total / norm;
        gs = y_total / norm;
        break;
      }
      case LossKind::ZLoss: {  // z_k = (o_k - mu) / sigma, l = softplus(a (b - z)) / a
        if (begin == end) break;
        const double mu = sj / Dd, var = qj / Dd - mu * mu;
        if (!(var > 0) || !std::isfinite(var))
          throw std::domain_error("z_loss is undefined for example " + std::to_string(j) +
                                  ": its outputs have zero variance (sigma^2 = " + std::to_string(var) + ")");
        const double sigma = std::sqrt(var);
        for (std::int64_t e = begin; e < end; ++e) {
          const double z = (static_cast<double>(A[e]) - mu) / sigma;
          const double x = spec.a * (spec.b - z);
          L += t.values[e] * softplus(x) / spec.a;
          const double gz = -t.values[e] * sigmoid(x);  // dL/dz
          dA[e] = static_cast<T>(gz / sigma);
          gs += gz * (-1 + z * mu / sigma) / (sigma * Dd);
          gq += -gz * z / (2 * var * Dd);
        }
        break;
      }
    }
    loss[j] = L;
    dq[j] = static_cast<T>(gq);
    ds[j] = static_cast<T>(gs);
  }
}

template void evaluate_loss<float>(const LossSpec&, std::int64_t, const Targets&, const std::uint8_t*, const float*,
                                   const float*, const float*, double*, float*, float*, float*);
template void evaluate_loss<double>(const LossSpec&, std::int64_t, const Targets&, const std::uint8_t*,
                                    const double*, const double*, const double*, double*, double*, double*, double*);

}  // namespace sparsetarget
