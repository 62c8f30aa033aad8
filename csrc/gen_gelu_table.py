"""Writes csrc/rbe_gelu_table.h: the tables of the AVX-512 gelu of csrc/rbe_act.c.

- rbe_gelu_mills: the normal distribution's Mills ratio R(t) = (1 - Phi(t)) / phi(t), t >= 0, on
  MILLS equal intervals of [0, MILLS_TOP];
- rbe_gelu_cdf: Phi(x) itself on CDF equal intervals of [CDF_LO, CDF_HI) (no exp needed: the value
  alone, where most pre-activations lie);
- rbe_gelu_pow2_8th: 2^(j/8), j = 0..7, for exp.
Each polynomial has degree DEGREE in u = (the argument) - (the interval's centre) and interpolates
its function at the interval's Chebyshev points, computed with mpmath at 40 digits. Deterministic:
run it again and the header is the same (a test checks that the header is this script's output).

    .venv/bin/python csrc/gen_gelu_table.py > csrc/rbe_gelu_table.h
    .venv/bin/python csrc/gen_gelu_table.py --error    # the polynomials' largest relative errors
"""
from __future__ import annotations

import sys

import mpmath as mp

DEGREE = 11
MILLS, MILLS_TOP = 16, 12
CDF, CDF_LO, CDF_HI = 16, -3, 5
mp.mp.dps = 40


def mills(t):
    return mp.erfc(t / mp.sqrt(2)) / 2 * mp.sqrt(2 * mp.pi) * mp.exp(t * t / 2)


def cdf(x):
    return mp.erfc(-x / mp.sqrt(2)) / 2


def interval_poly(f, lo, width, i: int) -> list[float]:
    """Coefficients (power 0 first) of f's interpolant on [lo + i width, lo + (i + 1) width], in
    u = (the argument) - (the interval's centre)."""
    c, h = lo + (i + mp.mpf(0.5)) * width, mp.mpf(width) / 2
    nodes = [c + h * mp.cos(mp.pi * (2 * m + 1) / (2 * (DEGREE + 1))) for m in range(DEGREE + 1)]
    a = mp.matrix([[(t - c) ** j for j in range(DEGREE + 1)] for t in nodes])
    coef = mp.lu_solve(a, mp.matrix([f(t) for t in nodes]))
    return [float(coef[j]) for j in range(DEGREE + 1)]


TABLES = (  # name, function, first interval's start, interval width, intervals
    ("rbe_gelu_mills", mills, 0, mp.mpf(MILLS_TOP) / MILLS, MILLS),
    ("rbe_gelu_cdf", cdf, CDF_LO, mp.mpf(CDF_HI - CDF_LO) / CDF, CDF),
)


def header() -> str:
    lines = ["/* rbe_gelu_table.h - written by csrc/gen_gelu_table.py; do not edit. */",
             f"#define RBE_GELU_DEGREE {DEGREE}",
             f"#define RBE_GELU_MILLS_TOP {MILLS_TOP}.0   /* rbe_gelu_mills: {MILLS} intervals of [0, top] */",
             f"#define RBE_GELU_CDF_LO ({CDF_LO}.0)      /* rbe_gelu_cdf: {CDF} intervals of [lo, hi) */",
             f"#define RBE_GELU_CDF_HI {CDF_HI}.0"]
    for name, f, lo, width, n in TABLES:
        polys = [interval_poly(f, lo, width, i) for i in range(n)]
        lines.append(f"/* {name}[j][i]: the coefficient of u^j on interval i */")
        lines.append(f"static const double {name}[{DEGREE + 1}][{n}] = {{")
        for j in range(DEGREE + 1):
            lines.append("    {" + ", ".join(repr(polys[i][j]) for i in range(n)) + "},")
        lines.append("};")
    lines.append("/* 2^(j/8) */")
    lines.append("static const double rbe_gelu_pow2_8th[8] = {"
                 + ", ".join(repr(float(mp.power(2, mp.mpf(j) / 8))) for j in range(8)) + "};")
    return "\n".join(lines) + "\n"


def largest_error(f, lo, width, n, samples: int = 200) -> float:
    """The largest relative error of the double Horner evaluation, over samples per interval."""
    worst = 0.0
    for i in range(n):
        co, c = interval_poly(f, lo, width, i), float(lo + (i + mp.mpf(0.5)) * width)
        for m in range(samples + 1):
            t = float(lo + width * i + width * m / samples)
            p = 0.0
            for cj in reversed(co):
                p = p * (t - c) + cj
            exact = f(mp.mpf(t))
            worst = max(worst, abs(float((p - exact) / exact)))
    return worst


if __name__ == "__main__":
    if "--error" in sys.argv[1:]:
        for name, f, lo, width, n in TABLES:
            print(f"{name}: largest relative error {largest_error(f, lo, width, n):.3g}")
    else:
        sys.stdout.write(header())
