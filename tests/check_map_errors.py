"""Checks the compile-time errors of the TensorMap loss overloads.

The losses cannot take a column-major map, rank 3, int scalars, float
and double mixed in one call, or a gradient that is an Eigen::Tensor or a
map of const scalars. Each must stop compilation, and the first error must
be the static_assert message of qrloss::detail::LossMapCheck or
GradMapCheck. Before these checks, such calls failed overload resolution,
or, for a Tensor gradient, compiled and lost the gradient. A valid row-major call must compile, so that a broken
compiler command cannot pass the test.

Usage: check_map_errors.py INCLUDE_DIR EIGEN_INCLUDE_DIR COMPILER [ARGS...]
"""

import os
import subprocess
import sys
import tempfile

PRELUDE = """
#include <qrloss/qrloss.hpp>
using RowMap4 = Eigen::TensorMap<Eigen::Tensor<float, 4, Eigen::RowMajor>>;
"""

# (name, body of `double f(float* a, float* b, double* c, int* d)`,
#  expected message or None for a call that must compile)
CASES = [
    ("row-major call compiles",
     "RowMap4 q(a, 2, 3, 4, 5), p(b, 2, 3, 4, 5);"
     " return qrloss::qr_loss(q, p);",
     None),
    ("column-major map rejected",
     "Eigen::TensorMap<Eigen::Tensor<float, 4>> q(a, 2, 3, 4, 5), "
     "p(b, 2, 3, 4, 5); return qrloss::qr_loss(q, p);",
     "qrloss: tensor maps must be Eigen::RowMajor"),
    ("rank 3 map rejected",
     "Eigen::TensorMap<Eigen::Tensor<float, 3, Eigen::RowMajor>> "
     "q(a, 2, 3, 4), p(b, 2, 3, 4); return qrloss::rq_loss(q, p);",
     "qrloss: tensor maps must have rank 2 (B,C) or 4 (B,C,H,W)"),
    ("int map rejected",
     "Eigen::TensorMap<Eigen::Tensor<int, 2, Eigen::RowMajor>> "
     "q(d, 2, 3), p(d, 2, 3); return qrloss::qr_loss_from_logits(q, p);",
     "qrloss: tensor maps must hold float or double"),
    ("mixed scalars rejected",
     "RowMap4 q(a, 2, 3, 4, 5), g(b, 2, 3, 4, 5);"
     " Eigen::TensorMap<Eigen::Tensor<double, 4, Eigen::RowMajor>> "
     "p(c, 2, 3, 4, 5); return qrloss::rq_loss_grad(q, p, g);",
     "qrloss: all tensor maps of a call must hold the same scalar type"),
    ("mixed scalars rejected without gradient",
     "RowMap4 q(a, 2, 3, 4, 5);"
     " Eigen::TensorMap<Eigen::Tensor<double, 4, Eigen::RowMajor>> "
     "p(c, 2, 3, 4, 5); return qrloss::qr_loss(q, p);",
     "qrloss: all tensor maps of a call must hold the same scalar type"),
    ("tensor gradient rejected",
     "RowMap4 q(a, 2, 3, 4, 5), p(b, 2, 3, 4, 5);"
     " Eigen::Tensor<float, 4, Eigen::RowMajor> g(2, 3, 4, 5);"
     " return qrloss::rq_loss_grad(q, p, g);",
     "qrloss: the gradient must be an Eigen::TensorMap over your buffer"),
    ("const gradient map rejected",
     "RowMap4 x(a, 2, 3, 4, 5), p(b, 2, 3, 4, 5);"
     " qrloss::ConstTensorView<float, 4> g(b, 2, 3, 4, 5);"
     " return qrloss::qr_loss_grad_from_logits(x, p, g);",
     "qrloss: the gradient map must be writable"),
    ("tensor inputs with a gradient view compile",
     "Eigen::Tensor<float, 4, Eigen::RowMajor> q(2, 3, 4, 5), p(2, 3, 4, 5);"
     " return qrloss::qr_loss_grad(q, p, RowMap4(a, 2, 3, 4, 5));",
     None),
    ("double gradient map rejected from logits",
     "RowMap4 x(a, 2, 3, 4, 5), p(b, 2, 3, 4, 5);"
     " Eigen::TensorMap<Eigen::Tensor<double, 4, Eigen::RowMajor>> "
     "g(c, 2, 3, 4, 5); return qrloss::qr_loss_grad_from_logits(x, p, g);",
     "qrloss: all tensor maps of a call must hold the same scalar type"),
]


def main() -> int:
    include_dir, eigen_dir, *compiler = sys.argv[1:]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="qrloss_map_errors_") as tmp:
        for name, body, expected in CASES:
            source = os.path.join(tmp, "case.cpp")
            with open(source, "w", encoding="utf-8") as out:
                out.write(PRELUDE)
                out.write("double f(float* a, float* b, double* c, int* d) {"
                          " (void)a; (void)b; (void)c; (void)d; "
                          + body + " }\n")
            result = subprocess.run(
                compiler + ["-std=c++17", "-fsyntax-only",
                            "-I" + include_dir, "-isystem", eigen_dir, source],
                capture_output=True, text=True)
            if expected is None:
                ok = result.returncode == 0
                detail = "expected it to compile"
            else:
                # The rule's message must be the first error, not one that
                # follows a failed overload resolution.
                errors = [line for line in result.stderr.splitlines()
                          if "error:" in line]
                ok = (result.returncode != 0 and bool(errors)
                      and expected in errors[0])
                detail = "expected the first error to contain: " + expected
            if not ok:
                failures += 1
                print(f"FAIL {name}: {detail}")
                print(result.stderr[-2000:])
            else:
                print(f"ok   {name}")
    print(f"{len(CASES) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
