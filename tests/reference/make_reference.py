#!/usr/bin/env python3
"""Generate the reference cases for the QR and RQ losses.

The losses are those of Rolf et al., "Resolving label uncertainty with
implicit generative models" (ICLR 2022), with the eps rules of torchgeo 0.8:
q = probs, p = target, N = number of pixels over (b, h, w), eps >= 0.

    QR: qbar_c = (1/N) sum_pixels q_c
        L = sum_c qbar_c log(qbar_c + eps) - (1/N) sum_pixels sum_c q_c log(p_c + eps)
    RQ: s_c = max(sum_pixels q_c, eps),  u_c = q_c p_c / s_c
        t = max(sum_c u_c, 1e-12) per pixel,  r_c = u_c / t
        L = (1/N) sum_pixels sum_c r_c (log(r_c + eps) - log(q_c + eps))

0 * log(0) counts as 0. Every value and gradient is computed in float64 with
NumPy from the closed-form gradients below (see qr_gradient and rq_gradient).
Before anything is written, each gradient is compared with three independent
derivatives: sixth-order central differences, the complex-step derivative
and, when torch can be imported, torch autograd of a separate torch
transcription of the losses. The script exits with status 1 and writes
nothing when any of them differs by more than CROSS_CHECK_TOLERANCE.

Usage (from the project root):
    /usr/bin/python3 tests/reference/make_reference.py
    /usr/bin/python3 tests/reference/make_reference.py --check-golden DIR

The output is the same bytes on every run.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT_DIR = PROJECT_ROOT / "tests" / "data" / "reference"
DEFAULT_PRIOR_PATH = (
    PROJECT_ROOT.parent
    / "shared"
    / "data"
    / "enviroatlas_cooccurrence"
    / "avg_nlcd_pa_whole_city_label_cooccurrences.npy"
)

DEFAULT_EPS = 1e-8

# RQ clamps each pixel's sum of u = q * p / s_c to at least this value.
PIXEL_SUM_FLOOR = 1e-12

# Largest accepted disagreement between the analytic gradient and any
# cross-check, measured by relative_deviation. On the current cases central
# differences agree to 2e-9 and the other checks to 4e-14.
CROSS_CHECK_TOLERANCE = 1e-7

# A loss that is exactly 0 (C = 1 with probs = 1 gives RQ = 0) is compared
# with torch on this absolute scale instead of relatively.
LOSS_ZERO_FLOOR = 1e-12

# Central-difference steps. For probs the step is a fraction of q, because
# log(q + eps) curves on the scale of q, and RQ's per-pixel normalisation
# can curve on a smaller scale still, so RQ takes the smaller fraction.
# Entries with q below CENTRAL_MIN_PROBS, exact zeros included, are left to
# the complex-step and torch checks: a step that small in a sum of order 1
# loses too many digits to round-off, and at q = 0 the curvature is on the
# scale of eps, which no float64 difference quotient resolves to 1e-7.
PROBS_STEP_MAX = 1e-4
PROBS_STEP_FRACTION = {"qr": 0.05, "rq": 0.02}
CENTRAL_MIN_PROBS = 1e-4
LOGITS_STEP = 1e-3

# Sixth-order central stencil: f'(x) ~ sum_j c_j (f(x + j h) - f(x - j h))
# / (CENTRAL_DENOMINATOR h) for j = 1, 2, 3, truncation error O(h^6).
CENTRAL_COEFFICIENTS = (45, -9, 1)
CENTRAL_DENOMINATOR = 60

# Imaginary step of the complex-step derivative. Its error is of order
# (step / curvature scale)^2. The smallest scale here is at a class whose
# sum is clamped to eps, where r = q p / (eps t) grows by about 1e9 per unit
# of q, so log(r + eps) curves over about 1e-17 in q.
COMPLEX_STEP = 1e-40

# Perturbed copies evaluated at once by the derivative checks.
BATCH_ROWS = 256

# Golden-case tolerances: loss relative error, and gradient error scaled as
# |g - g_ref| / (|g_ref| + median |g_ref|) for float64 cases and as
# max |g - g_ref| / max |g_ref| for float32 cases.
GOLDEN_TOLERANCE = {
    "float64": {"loss": 1e-10, "grad": 1e-10},
    "float32": {"loss": 1e-6, "grad": 1e-5},
}

LOSS_NAMES = ("qr", "rq")


# ---------------------------------------------------------------------------
# Layout. Internally every tensor is (B, C, S) with S = H * W, so pixels run
# over axes 0 and 2, and a rank-2 (B, C) tensor is (B, C, 1). The loss functions
# take a leading batch axis K of perturbed copies: (K, B, C, S).
# ---------------------------------------------------------------------------


def to_bcs(array):
    """Reshape a (B, C) or (B, C, H, W) array to (B, C, S)."""
    if array.ndim == 2:
        return array.reshape(array.shape[0], array.shape[1], 1)
    if array.ndim == 4:
        return array.reshape(array.shape[0], array.shape[1], -1)
    raise ValueError(f"expected a rank-2 or rank-4 array, got shape {array.shape}")


def xlogy(x, y):
    """Return x * log(y) elementwise, with 0 where x is exactly 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        product = x * np.log(y)
    return np.where(x == 0, 0, product)


def clamp_min(values, floor):
    """Return max(values, floor), deciding on the real part for complex input.

    Deciding on the real part keeps the complex-step derivative of a clamped
    value at 0, the same rule as for the analytic gradient.
    """
    return np.where(np.real(values) >= floor, values, floor)


def softmax(logits, axis):
    """Softmax over `axis`, shifted by the real max for stability."""
    shifted = logits - np.max(np.real(logits), axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------
# Losses as weighted sums of term arrays. The central-difference check
# differences the terms before summing them, which keeps the round-off of
# the large sums out of the difference quotient.
# ---------------------------------------------------------------------------


def qr_terms(q, p, eps):
    """Return [(weight, terms)] whose weighted sums add up to the QR loss.

    q and p are (K, B, C, S), and the sums have one entry per copy along K.
    """
    n_pixels = q.shape[1] * q.shape[3]
    qbar = q.sum(axis=(1, 3)) / n_pixels
    return [(1.0, xlogy(qbar, qbar + eps)), (-1.0 / n_pixels, xlogy(q, p + eps))]


def rq_terms(q, p, eps):
    """Return [(weight, terms)] whose weighted sums add up to the RQ loss."""
    n_pixels = q.shape[1] * q.shape[3]
    class_sum = clamp_min(q.sum(axis=(1, 3), keepdims=True), eps)
    u = q * p / class_sum
    pixel_sum = clamp_min(u.sum(axis=2, keepdims=True), PIXEL_SUM_FLOOR)
    r = u / pixel_sum
    return [(1.0 / n_pixels, xlogy(r, r + eps) - xlogy(r, q + eps))]


TERMS = {"qr": qr_terms, "rq": rq_terms}


def sum_terms(weighted_terms):
    """Add up [(weight, terms)] per copy along the leading axis."""
    copies = weighted_terms[0][1].shape[0]
    total = 0
    for weight, terms in weighted_terms:
        total = total + weight * terms.reshape(copies, -1).sum(axis=1)
    return total


def loss_value(loss, probs, target, eps):
    """Return the loss of one (B, C, S) pair as a Python float."""
    return float(sum_terms(TERMS[loss](probs[None], target[None], eps))[0])


# ---------------------------------------------------------------------------
# Analytic gradients, the values this script stores.
# ---------------------------------------------------------------------------


def qr_gradient(q, p, eps):
    """Return dL/dq of the QR loss for (B, C, S) arrays.

    dL/dq_c = (1/N) (log(qbar_c + eps) + qbar_c / (qbar_c + eps) - log(p_c + eps))
    """
    n_pixels = q.shape[0] * q.shape[2]
    qbar = q.sum(axis=(0, 2), keepdims=True) / n_pixels
    return (np.log(qbar + eps) + qbar / (qbar + eps) - np.log(p + eps)) / n_pixels


def rq_gradient(q, p, eps):
    """Return dL/dq of the RQ loss for (B, C, S) arrays.

    With u, t and r as in the module docstring:
      a_c = log(r_c + eps) - log(q_c + eps) + r_c / (r_c + eps)
      abar = sum_c a_c r_c per pixel, 0 where the pixel sum is clamped
      w_c = p_c / (s_c t),  G_c = (1/N) sum_pixels r_c (a_c - abar)
      dL/dq_c = (1/N) w_c (a_c - abar - q_c / (q_c + eps)) - G_c / s_c
    The last term is dropped for a class whose sum is clamped to eps, since
    the clamped s_c does not depend on q.
    """
    n_pixels = q.shape[0] * q.shape[2]
    raw_class_sum = q.sum(axis=(0, 2), keepdims=True)
    class_sum = np.maximum(raw_class_sum, eps)
    u = q * p / class_sum
    raw_pixel_sum = u.sum(axis=1, keepdims=True)
    pixel_sum = np.maximum(raw_pixel_sum, PIXEL_SUM_FLOOR)
    r = u / pixel_sum

    a = np.log(r + eps) - np.log(q + eps) + r / (r + eps)
    abar = np.where(raw_pixel_sum < PIXEL_SUM_FLOOR, 0.0, (a * r).sum(axis=1, keepdims=True))
    w = p / (class_sum * pixel_sum)
    class_term = (r * (a - abar)).sum(axis=(0, 2), keepdims=True) / n_pixels
    class_term = np.where(raw_class_sum >= eps, class_term / class_sum, 0.0)
    return w * (a - abar - q / (q + eps)) / n_pixels - class_term


GRADIENTS = {"qr": qr_gradient, "rq": rq_gradient}


def softmax_vjp(q, dL_dq):
    """Chain dL/dq to logits: dL/dx_c = q_c (g_c - sum_k g_k q_k).

    The sum is formed as sum_k q_k (g_c - g_k), which is the same value
    because sum_k q_k = 1, but keeps full relative accuracy at a class whose
    q is close to 1, where g_c - sum_k g_k q_k cancels.
    """
    differences = dL_dq[:, :, None, :] - dL_dq[:, None, :, :]
    return q * (differences * q[:, None, :, :]).sum(axis=2)


# ---------------------------------------------------------------------------
# Cross-checks.
# ---------------------------------------------------------------------------


def relative_deviation(analytic, check):
    """Return max |analytic - check| / (|analytic| + typical |analytic|).

    The typical magnitude is the median of the non-zero |analytic| entries.
    It keeps entries near 0, where a relative error means nothing, on the
    scale of the whole tensor. A tensor that is 0 everywhere is compared on
    an absolute scale of 1.
    """
    magnitude = np.abs(analytic)
    nonzero = magnitude[magnitude > 0]
    typical = np.median(nonzero) if nonzero.size else 1.0
    return float(np.max(np.abs(analytic - check) / (magnitude + typical)))


def perturbed_copies(base, flat_indices, steps):
    """Return copies of `base` with base.flat[flat_indices[k]] += steps[k]."""
    count = len(flat_indices)
    copies = np.repeat(base[None], count, axis=0)
    flat = copies.reshape(count, -1)
    flat[np.arange(count), flat_indices] += steps
    return copies


def central_differences(terms_of, base, flat_indices, steps):
    """Return sixth-order central differences of a loss at the given entries.

    terms_of maps (K, B, C, S) copies to [(weight, terms)]. The terms are
    differenced before they are summed, so the round-off of the full sums
    does not enter the difference quotient.
    """
    derivatives = np.empty(len(flat_indices))
    for start in range(0, len(flat_indices), BATCH_ROWS):
        indices = flat_indices[start:start + BATCH_ROWS]
        h = steps[start:start + BATCH_ROWS]
        total = 0
        for multiple, coefficient in enumerate(CENTRAL_COEFFICIENTS, start=1):
            plus = terms_of(perturbed_copies(base, indices, multiple * h))
            minus = terms_of(perturbed_copies(base, indices, -multiple * h))
            for (weight, plus_terms), (_, minus_terms) in zip(plus, minus):
                difference = (plus_terms - minus_terms).reshape(len(indices), -1).sum(axis=1)
                total = total + weight * coefficient * difference
        derivatives[start:start + len(indices)] = total / (CENTRAL_DENOMINATOR * h)
    return derivatives


def complex_step_derivatives(terms_of, base):
    """Return Im f(x + i h e_k) / h for every entry k of `base`.

    The complex step has no subtractive cancellation, so it is exact to
    rounding also where the function curves on the scale of eps.
    """
    size = base.size
    derivatives = np.empty(size)
    complex_base = base.astype(np.complex128)
    for start in range(0, size, BATCH_ROWS):
        indices = np.arange(start, min(start + BATCH_ROWS, size))
        steps = np.full(len(indices), 1j * COMPLEX_STEP)
        values = sum_terms(terms_of(perturbed_copies(complex_base, indices, steps)))
        derivatives[start:start + len(indices)] = values.imag / COMPLEX_STEP
    return derivatives.reshape(base.shape)


def torch_losses_and_gradients(probs, target, logits, eps):
    """Return {(loss, path): (value, gradient)} from torch autograd.

    The losses are transcribed again in torch, with plain sums over the
    class and pixel axes. Inputs and results are (B, C, S) float64.
    """
    import torch

    def qr(q, p):
        n_pixels = q.shape[0] * q.shape[2]
        qbar = q.sum(dim=(0, 2)) / n_pixels
        return (qbar * torch.log(qbar + eps)).sum() - (q * torch.log(p + eps)).sum() / n_pixels

    def rq(q, p):
        n_pixels = q.shape[0] * q.shape[2]
        class_sum = q.sum(dim=(0, 2), keepdim=True).clamp_min(eps)
        u = q * p / class_sum
        r = u / u.sum(dim=1, keepdim=True).clamp_min(PIXEL_SUM_FLOOR)
        return (r * (torch.log(r + eps) - torch.log(q + eps))).sum() / n_pixels

    functions = {"qr": qr, "rq": rq}
    p = torch.from_numpy(target)
    results = {}
    for loss in LOSS_NAMES:
        q = torch.from_numpy(probs).clone().requires_grad_(True)
        value = functions[loss](q, p)
        value.backward()
        results[(loss, "probs")] = (value.item(), q.grad.numpy().copy())
        if logits is not None:
            x = torch.from_numpy(logits).clone().requires_grad_(True)
            value = functions[loss](torch.softmax(x, dim=1), p)
            value.backward()
            results[(loss, "logits")] = (value.item(), x.grad.numpy().copy())
    return results


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def cross_check(reference, use_torch):
    """Compare every gradient of a computed case with the independent checks.

    Returns {check name: worst relative_deviation}. Raises CrossCheckError
    naming the case, loss, path and check when one exceeds the tolerance.
    """
    eps = reference["eps"]
    probs, target, logits = reference["probs"], reference["target"], reference["logits"]
    worst = {"central": 0.0, "complex": 0.0}
    torch_results = None
    if use_torch:
        worst["torch"] = 0.0
        torch_results = torch_losses_and_gradients(probs, target, logits, eps)

    def record(check, loss, path, deviation):
        worst[check] = max(worst[check], deviation)
        if not deviation <= CROSS_CHECK_TOLERANCE:
            raise CrossCheckError(
                f"{reference['name']}: {loss} gradient with respect to {path} differs from the "
                f"{check} check by {deviation:.3e} relative "
                f"(tolerance {CROSS_CHECK_TOLERANCE:g})"
            )

    for loss in LOSS_NAMES:
        terms = TERMS[loss]
        paths = [("probs", probs, lambda q, terms=terms: terms(q, target[None], eps))]
        if logits is not None:
            paths.append(
                ("logits", logits,
                 lambda x, terms=terms: terms(softmax(x, axis=2), target[None], eps)))
        for path, base, terms_of in paths:
            analytic = reference[f"grad_{loss}_{path}"]

            if path == "probs":
                flat_indices = np.flatnonzero(base >= CENTRAL_MIN_PROBS)
                steps = np.minimum(PROBS_STEP_MAX,
                                   PROBS_STEP_FRACTION[loss] * base.flat[flat_indices])
            else:
                flat_indices = np.arange(base.size)
                steps = np.full(base.size, LOGITS_STEP)
            numeric = analytic.copy()
            numeric.flat[flat_indices] = central_differences(terms_of, base, flat_indices, steps)
            record("central", loss, path, relative_deviation(analytic, numeric))

            record("complex", loss, path,
                   relative_deviation(analytic, complex_step_derivatives(terms_of, base)))

            if torch_results is not None:
                torch_value, torch_gradient = torch_results[(loss, path)]
                value = reference[f"loss_{loss}" + ("" if path == "probs" else "_from_logits")]
                loss_deviation = abs(value - torch_value) / max(abs(torch_value), LOSS_ZERO_FLOOR)
                record("torch", loss, path, max(loss_deviation,
                                                relative_deviation(analytic, torch_gradient)))
    return worst


class CrossCheckError(RuntimeError):
    """An analytic gradient disagrees with an independent derivative."""


# ---------------------------------------------------------------------------
# The reference computation for one case.
# ---------------------------------------------------------------------------


def compute_reference(name, probs, target, logits, eps):
    """Compute losses and gradients of one case in float64.

    probs, target and logits are the arrays as stored, float32 or float64.
    float32 inputs are widened exactly, so the results are the true values
    for the stored inputs. The logits path takes the float64 softmax of the
    widened logits, not the stored probs.
    """
    shape = probs.shape
    q = to_bcs(probs.astype(np.float64))
    p = to_bcs(target.astype(np.float64))
    x = None if logits is None else to_bcs(logits.astype(np.float64))
    reference = {"name": name, "eps": eps, "probs": q, "target": p, "logits": x}
    for loss in LOSS_NAMES:
        reference[f"loss_{loss}"] = loss_value(loss, q, p, eps)
        reference[f"grad_{loss}_probs"] = GRADIENTS[loss](q, p, eps)
        if x is not None:
            q_from_logits = softmax(x, axis=1)
            reference[f"loss_{loss}_from_logits"] = loss_value(loss, q_from_logits, p, eps)
            reference[f"grad_{loss}_logits"] = softmax_vjp(
                q_from_logits, GRADIENTS[loss](q_from_logits, p, eps))
    reference["shape"] = list(shape)
    return reference


def stored_gradient(reference, key):
    """Return a gradient in the case's original shape, as float64."""
    return reference[key].reshape(reference["shape"])


# ---------------------------------------------------------------------------
# Case definitions. Each builder draws float64 inputs and passes them to
# finish_case, which rounds them to the case dtype.
# ---------------------------------------------------------------------------


ABSENT_CLASS = 2
# Scales one class of probs so that its sum over 18 pixels is positive but
# below the default eps. s_c is then clamped while r != 0 in that class.
TINY_CLASS = 1
TINY_CLASS_SCALE = 1e-10
ZERO_TARGET_PIXELS = ((0, 1, 1), (1, 2, 0))
TINY_TARGET_PIXEL = (1, 0, 2)
# Scales one pixel's normalised target so that its sum of q * p / s_c stays
# far below PIXEL_SUM_FLOOR. The clamp is then active while r != 0.
TINY_TARGET_SCALE = 1e-13
ENVIROATLAS_BLOCK = 4
ENVIROATLAS_SEED = 110


def normalized_uniform(rng, shape, low=0.05):
    """Draw entries from U(low, 1) and normalise them over the class axis."""
    values = rng.uniform(low, 1.0, size=shape)
    return values / values.sum(axis=1, keepdims=True)


def finish_case(spec, probs, target, logits):
    """Round the inputs to the case dtype and attach them to the spec.

    When logits are given, the stored probs are softmax(logits) computed in
    float64 from the rounded logits and then rounded to the case dtype.
    """
    dtype = np.dtype(spec["dtype"])
    if logits is not None:
        logits = logits.astype(dtype)
        probs = softmax(logits.astype(np.float64), axis=1)
    spec["probs"] = np.ascontiguousarray(probs.astype(dtype))
    spec["target"] = np.ascontiguousarray(target.astype(dtype))
    spec["logits"] = None if logits is None else np.ascontiguousarray(logits)
    return spec


def build_single_class(spec, rng):
    shape = spec["shape"]
    logits = rng.normal(size=shape)
    # With C = 1 the target is not normalised, so the losses do not vanish.
    target = rng.uniform(0.05, 1.0, size=shape)
    return finish_case(spec, None, target, logits)


def build_random(spec, rng, logit_scale=1.5):
    shape = spec["shape"]
    logits = logit_scale * rng.normal(size=shape)
    target = normalized_uniform(rng, shape)
    return finish_case(spec, None, target, logits)


def build_onehot(spec, rng):
    shape = spec["shape"]
    logits = 1.5 * rng.normal(size=shape)
    labels = rng.integers(0, shape[1], size=(shape[0],) + tuple(shape[2:]))
    target = (np.arange(shape[1]).reshape(1, -1, 1, 1) == labels[:, None]).astype(np.float64)
    return finish_case(spec, None, target, logits)


def build_zero_probs(spec, rng):
    shape = spec["shape"]
    probs = rng.uniform(0.05, 1.0, size=shape)
    # Zero about a fifth of the entries, keeping at least one class per pixel.
    zero_mask = rng.uniform(size=shape) < 0.2
    zero_mask[:, 0] &= zero_mask[:, 1:].sum(axis=1) < shape[1] - 1
    probs[zero_mask] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    target = normalized_uniform(rng, shape)
    return finish_case(spec, probs, target, None)


def build_absent_class(spec, rng):
    shape = spec["shape"]
    probs = rng.uniform(0.05, 1.0, size=shape)
    probs[:, ABSENT_CLASS] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    target = normalized_uniform(rng, shape)
    return finish_case(spec, probs, target, None)


def build_tiny_class(spec, rng):
    shape = spec["shape"]
    probs = rng.uniform(0.05, 1.0, size=shape)
    probs[:, TINY_CLASS] *= TINY_CLASS_SCALE
    probs /= probs.sum(axis=1, keepdims=True)
    target = normalized_uniform(rng, shape)
    return finish_case(spec, probs, target, None)


def build_zero_target_pixel(spec, rng):
    shape = spec["shape"]
    logits = 1.5 * rng.normal(size=shape)
    target = normalized_uniform(rng, shape)
    for b, h, w in ZERO_TARGET_PIXELS:
        target[b, :, h, w] = 0.0
    b, h, w = TINY_TARGET_PIXEL
    target[b, :, h, w] *= TINY_TARGET_SCALE
    return finish_case(spec, None, target, logits)


def build_enviroatlas_prior(spec, rng, prior_path):
    shape = spec["shape"]
    cooccurrence = np.load(prior_path)
    if cooccurrence.shape != (shape[1], 17):
        raise SystemExit(
            f"error: {prior_path}: expected an ({shape[1]}, 17) co-occurrence matrix, "
            f"got shape {cooccurrence.shape}")
    columns = usable_prior_columns(cooccurrence)
    block = ENVIROATLAS_BLOCK
    block_grid = (shape[0], shape[2] // block, shape[3] // block)
    coarse = columns[rng.integers(0, len(columns), size=block_grid)]
    coarse = np.repeat(np.repeat(coarse, block, axis=1), block, axis=2)
    target = np.moveaxis(cooccurrence[:, coarse], 0, 1)
    logits = 2.0 * rng.normal(size=shape)
    return finish_case(spec, None, target, logits)


def usable_prior_columns(cooccurrence):
    """Return the columns that are not placeholders (all mass on row 0)."""
    placeholder = (cooccurrence[0] == 1.0) & (cooccurrence[1:] == 0.0).all(axis=0)
    return np.flatnonzero(~placeholder)


def case_specs():
    """Return (spec, builder) pairs in the order of cases.json."""
    def spec(name, dtype, shape, seed, note, eps=DEFAULT_EPS):
        return {"name": name, "dtype": dtype, "eps": eps, "shape": list(shape),
                "note": note, "seed": seed}

    return [
        (spec("c1_f64", "float64", (2, 1, 3, 4), 101,
              "C = 1: softmax gives probs = 1 and a zero logits gradient; "
              "target is not normalised"), build_single_class),
        (spec("bc_f64", "float64", (7, 5), 102, "two-dimensional (B, C) input"),
         build_random),
        (spec("bc_f32", "float32", (9, 3), 103, "two-dimensional (B, C) input"),
         build_random),
        (spec("onehot_f64", "float64", (2, 4, 3, 5), 104,
              "one-hot target: exact zeros in target"), build_onehot),
        (spec("zero_probs_f64", "float64", (2, 3, 4, 4), 105,
              "probs has exact zeros (one-sided derivative), every class present; "
              "no logits"), build_zero_probs),
        (spec("absent_class_f64", "float64", (2, 4, 3, 3), 106,
              f"class {ABSENT_CLASS} is 0 everywhere in probs, so the RQ class sum is "
              "clamped to eps; no logits"), build_absent_class),
        (spec("tiny_class_f64", "float64", (2, 4, 3, 3), 111,
              f"class {TINY_CLASS} of probs sums to about 1e-9 < eps, so the RQ class "
              "sum is clamped while the class still carries mass; no logits"),
         build_tiny_class),
        (spec("zero_target_pixel_f64", "float64", (2, 3, 3, 3), 107,
              "target is 0 at pixels (b,h,w) = (0,1,1) and (1,2,0), and scaled by "
              "1e-13 at (1,0,2): the RQ pixel-sum clamp is active"),
         build_zero_target_pixel),
        (spec("distinct_extents_f64", "float64", (2, 5, 3, 4), 108,
              "all extents differ, so swapped axes fail"), build_random),
        (spec("eps_zero_f64", "float64", (1, 3, 4, 5), 109,
              "eps = 0 with strictly positive probs and target", eps=0.0), build_random),
        (spec("enviroatlas_prior_f32", "float32", (2, 11, 16, 16), ENVIROATLAS_SEED,
              "target columns of the EnviroAtlas Pittsburgh PA co-occurrence matrix, "
              "one NLCD class per 4x4 block; rows that are 0 give exact zeros"),
         "enviroatlas"),
        (spec("enviroatlas_prior_f64", "float64", (2, 11, 16, 16), ENVIROATLAS_SEED,
              "target columns of the EnviroAtlas Pittsburgh PA co-occurrence matrix, "
              "one NLCD class per 4x4 block; rows that are 0 give exact zeros"),
         "enviroatlas"),
    ]


def check_case_features(case, reference):
    """Raise CaseFeatureError unless a case contains what its name promises."""
    name = case["name"]
    q, p, eps = reference["probs"], reference["target"], reference["eps"]
    class_sums = q.sum(axis=(0, 2))
    pixel_sums = (q * p / np.maximum(class_sums, eps)[None, :, None]).sum(axis=1)

    def require(condition, message):
        if not condition:
            raise CaseFeatureError(f"{name}: {message}")

    require(np.all(np.isfinite(q)) and np.all(np.isfinite(p)), "non-finite input")
    if name == "zero_probs_f64":
        require(np.any(q == 0), "probs has no exact zeros")
        require(np.all(class_sums >= eps), "a class sum is below eps")
    elif name == "absent_class_f64":
        require(class_sums[ABSENT_CLASS] < eps, "the absent class sum is not below eps")
    elif name == "tiny_class_f64":
        require(0 < class_sums[TINY_CLASS] < eps, "the tiny class sum is not in (0, eps)")
    elif name == "zero_target_pixel_f64":
        clamped = pixel_sums < PIXEL_SUM_FLOOR
        require(clamped.sum() == len(ZERO_TARGET_PIXELS) + 1, "wrong number of clamped pixels")
        require(np.any(clamped & (p.sum(axis=1) > 0)), "no clamped pixel with a non-zero target")
    elif name == "eps_zero_f64":
        require(eps == 0.0 and np.all(q > 0) and np.all(p > 0), "inputs are not positive")
    elif name.startswith("onehot") or name.startswith("enviroatlas"):
        require(np.any(p == 0), "target has no exact zeros")
    if not name.startswith(("zero_target_pixel", "absent_class", "tiny_class")):
        require(np.all(pixel_sums >= PIXEL_SUM_FLOOR), "unexpected pixel-sum clamp")
        require(np.all(class_sums >= eps), "unexpected class-sum clamp")


class CaseFeatureError(RuntimeError):
    """A generated case lacks the feature it is meant to test."""


def build_cases(prior_path):
    cases = []
    for spec, builder in case_specs():
        rng = np.random.default_rng(spec["seed"])
        if builder == "enviroatlas":
            cases.append(build_enviroatlas_prior(spec, rng, prior_path))
        else:
            cases.append(builder(spec, rng))
    return cases


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------


def case_entry(case, reference):
    """Return the cases.json object of one case."""
    entry = {key: case[key] for key in ("name", "dtype", "eps", "shape", "note", "seed")}
    for loss in LOSS_NAMES:
        entry[f"loss_{loss}"] = reference[f"loss_{loss}"]
        if case["logits"] is not None:
            entry[f"loss_{loss}_from_logits"] = reference[f"loss_{loss}_from_logits"]
    entry["files"] = sorted(case_arrays(case, reference))
    return entry


def case_arrays(case, reference):
    """Return {file name: array} for one case folder."""
    arrays = {"probs.npy": case["probs"], "target.npy": case["target"]}
    paths = ["probs"]
    if case["logits"] is not None:
        arrays["logits.npy"] = case["logits"]
        paths.append("logits")
    for loss in LOSS_NAMES:
        for path in paths:
            key = f"grad_{loss}_{path}"
            arrays[f"{key}.npy"] = stored_gradient(reference, key)
    return arrays


def write_cases(output_dir, cases, references):
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for case, reference in zip(cases, references):
        case_dir = output_dir / case["name"]
        case_dir.mkdir(exist_ok=True)
        for stale in sorted(case_dir.glob("*.npy")):
            stale.unlink()
        for file_name, array in sorted(case_arrays(case, reference).items()):
            np.save(case_dir / file_name, np.ascontiguousarray(array), allow_pickle=False)
        entries.append(case_entry(case, reference))
    with open(output_dir / "cases.json", "w", encoding="utf-8") as stream:
        json.dump(entries, stream, indent=1)
        stream.write("\n")


def print_summary(cases, references, checks):
    header = (f"{'case':<24}{'dtype':<9}{'shape':<15}{'eps':>7}  {'loss_qr':>12}"
              f"{'loss_rq':>12}  {'central':>8}{'complex':>9}{'torch':>9}")
    print(header)
    print("-" * len(header))
    for case, reference, worst in zip(cases, references, checks):
        shape = "x".join(str(extent) for extent in case["shape"])
        torch_text = f"{worst['torch']:9.0e}" if "torch" in worst else f"{'skipped':>9}"
        print(f"{case['name']:<24}{case['dtype']:<9}{shape:<15}{case['eps']:>7g}  "
              f"{reference['loss_qr']:12.6g}{reference['loss_rq']:12.6g}  "
              f"{worst['central']:8.0e}{worst['complex']:9.0e}{torch_text}")
    print(f"\nCheck columns: worst |g - check| / (|g| + median of the non-zero |g|) over "
          f"both losses and both paths; the tolerance is {CROSS_CHECK_TOLERANCE:g}.\n"
          f"Central differences skip probs entries below {CENTRAL_MIN_PROBS:g}, which the "
          "complex-step and torch checks cover.")


# ---------------------------------------------------------------------------
# Golden-case comparison.
# ---------------------------------------------------------------------------


def golden_deviation(golden, computed):
    """Return max |computed - golden| / (|golden| + median |golden|).

    An entry whose scale is 0 counts as 0 when it matches exactly and as inf
    otherwise.
    """
    scale = np.abs(golden) + np.median(np.abs(golden))
    difference = np.abs(computed - golden)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(difference == 0, 0.0, difference / scale)
    return float(np.max(ratio))


def meets_float64_golden_tolerance(golden, computed):
    """Apply the float64 golden rule with a round-off floor.

    Each element must satisfy |g - g_ref| <= 1e-10 (|g_ref| + median |g_ref|)
    + GOLDEN_ROUNDOFF_FLOOR max |g_ref|. Without the floor, a tensor whose
    exact values are mostly 0 (RQ with a one-hot target) has a median made of
    round-off, and exact zeros could never pass.
    """
    magnitude = np.abs(golden)
    allowed = (GOLDEN_TOLERANCE["float64"]["grad"] * (magnitude + np.median(magnitude))
               + GOLDEN_ROUNDOFF_FLOOR * magnitude.max())
    return bool(np.all(np.abs(computed - golden) <= allowed))


# Round-off floor of the float64 golden comparison, relative to max |g_ref|.
GOLDEN_ROUNDOFF_FLOOR = 1e-14


def check_golden(golden_dir):
    """Recompute every case listed in golden_dir/cases.json and print deviations.

    Returns True when every case meets the golden tolerances.
    """
    with open(golden_dir / "cases.json", encoding="utf-8") as stream:
        entries = json.load(stream)
    header = (f"{'case':<24}{'dtype':<9}{'loss':<6}{'path':<8}{'loss rel':>10}"
              f"{'grad/max':>10}{'grad/med':>10}  result")
    print(header)
    print("-" * len(header))
    all_pass = True
    for entry in entries:
        case_dir = golden_dir / entry["name"]
        load = lambda file_name: np.load(case_dir / file_name)  # noqa: E731
        logits = load("logits.npy") if "logits.npy" in entry["files"] else None
        reference = compute_reference(entry["name"], load("probs.npy"), load("target.npy"),
                                      logits, entry["eps"])
        tolerance = GOLDEN_TOLERANCE[entry["dtype"]]
        for loss in LOSS_NAMES:
            for path in ("probs", "logits") if logits is not None else ("probs",):
                suffix = "" if path == "probs" else "_from_logits"
                golden_loss = entry[f"loss_{loss}{suffix}"]
                loss_rel = abs(reference[f"loss_{loss}{suffix}"] - golden_loss) / abs(golden_loss)
                golden_grad = load(f"grad_{loss}_{path}.npy")
                grad = stored_gradient(reference, f"grad_{loss}_{path}")
                difference = np.abs(grad - golden_grad)
                grad_to_max = float(difference.max() / np.abs(golden_grad).max())
                grad_to_median = golden_deviation(golden_grad, grad)
                if entry["dtype"] == "float64":
                    grad_passed = meets_float64_golden_tolerance(golden_grad, grad)
                else:
                    grad_passed = grad_to_max <= tolerance["grad"]
                passed = loss_rel <= tolerance["loss"] and grad_passed
                all_pass &= passed
                print(f"{entry['name']:<24}{entry['dtype']:<9}{loss:<6}{path:<8}"
                      f"{loss_rel:10.1e}{grad_to_max:10.1e}{grad_to_median:10.1e}  "
                      f"{'pass' if passed else 'FAIL'}")
    print("\nloss rel: |L - L_golden| / |L_golden|; grad/max: max |g - g_golden| / "
          "max |g_golden|;\ngrad/med: max |g - g_golden| / (|g_golden| + median |g_golden|).")
    print(f"Tolerances: float64 loss 1e-10 and grad/med 1e-10 plus an absolute floor of "
          f"{GOLDEN_ROUNDOFF_FLOOR:g} max |g_golden|;\nfloat32 loss 1e-6 and grad/max 1e-5.")
    return all_pass


# ---------------------------------------------------------------------------


def parse_arguments():
    parser = argparse.ArgumentParser(
        description="Generate the QR/RQ reference cases (float64 NumPy, cross-checked "
                    "by central differences, complex step and torch autograd).")
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT_DIR,
                        help="folder for cases.json and the case folders "
                             "(default: tests/data/reference)")
    parser.add_argument("--prior", type=pathlib.Path, default=DEFAULT_PRIOR_PATH,
                        help="EnviroAtlas co-occurrence matrix (11 x 17, float64) whose "
                             f"columns become the target of the enviroatlas cases "
                             f"(default: {DEFAULT_PRIOR_PATH})")
    parser.add_argument("--check-golden", type=pathlib.Path, metavar="DIR",
                        help="instead of generating, recompute the cases listed in "
                             "DIR/cases.json and print the deviations")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the torch autograd cross-check")
    return parser.parse_args()


def main():
    arguments = parse_arguments()
    if arguments.check_golden is not None:
        return 0 if check_golden(arguments.check_golden) else 1

    if not arguments.prior.is_file():
        print(f"error: co-occurrence matrix not found: {arguments.prior}; "
              "pass its path with --prior", file=sys.stderr)
        return 1
    use_torch = not arguments.no_torch and torch_available()
    if not use_torch and not arguments.no_torch:
        print("note: torch cannot be imported, so the torch autograd check is skipped",
              file=sys.stderr)

    cases = build_cases(arguments.prior)
    references, checks = [], []
    try:
        for case in cases:
            reference = compute_reference(case["name"], case["probs"], case["target"],
                                          case["logits"], case["eps"])
            check_case_features(case, reference)
            references.append(reference)
            checks.append(cross_check(reference, use_torch))
    except (CrossCheckError, CaseFeatureError) as error:
        print(f"error: {error}; nothing was written", file=sys.stderr)
        return 1

    write_cases(arguments.output, cases, references)
    print_summary(cases, references, checks)
    print(f"Wrote {len(cases)} cases to {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
