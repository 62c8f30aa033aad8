"""Compressing a dense matrix into the RBE format and back (DESIGN.md section 2)."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from ._ops import ops


def index_dtype(block_size: int) -> torch.dtype:
    """Flat positions u*b+v fit int16 up to b = 128; int32 above."""
    return torch.int16 if block_size <= 128 else torch.int32


def num_blocks(out_features: int, in_features: int, block_size: int) -> int:
    return -(-out_features // block_size) * -(-in_features // block_size)


def check_sizes(block_size: int, k: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 4 <= block_size <= 256:
        raise ValueError(f"block_size must be an int in [4, 256], got {block_size!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= block_size * block_size:
        raise ValueError(f"k must be an int in [0, block_size**2 = {block_size * block_size}], got {k!r}")


@dataclass
class CompressedWeight:
    """One weight matrix [out, in] in RBE form.

    basis [R*C, 8] pattern coefficients, coeffs [R*C, k] kept DCT residual
    values, index [R*C, k] their flat positions u*b+v (sorted within a block).
    ``relative_error`` is ||W - decode||_F / ||W||_F over the real entries,
    known exactly at encoding time (or ``None`` when not built from a matrix).

    Data-aware encodings (``compress(..., calibration=X)``) also carry ``output_error``,
    ||(W - decode) X^T||_F / ||W X^T||_F on the calibration inputs, and ``output_error_plain``,
    the same figure for the plain encoder's result (``None`` for plain encodings).
    ``plain_block_rows`` counts the block rows where the plain encoding was kept (it was better
    on the calibration data).
    """

    basis: torch.Tensor
    coeffs: torch.Tensor
    index: torch.Tensor
    shape: tuple
    block_size: int
    relative_error: float | None = None
    block_errors: torch.Tensor | None = None  # [R*C] squared error of each block
    output_error: float | None = None
    output_error_plain: float | None = None
    plain_block_rows: int | None = None

    @property
    def k(self) -> int:
        return self.coeffs.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (basis + coeffs + index)."""
        return sum(t.numel() * t.element_size() for t in (self.basis, self.coeffs, self.index))

    @property
    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * self.coeffs.element_size()

    @property
    def compression_ratio(self) -> float:
        return self.dense_nbytes / self.nbytes

    def decompress(self) -> torch.Tensor:
        """The dense [out, in] matrix the stored numbers describe (a new tensor)."""
        return decompress(self.basis, self.coeffs, self.index, self.shape, self.block_size)


def compress(weight: torch.Tensor, block_size: int = 64, k: int = 300, calibration: torch.Tensor | None = None, *,
             second_moment: torch.Tensor | None = None, damp: float = 0.01, select: str = "obs") -> CompressedWeight:
    """Encode a dense [out, in] float32/float64 matrix into the RBE format.

    Each b x b block keeps 8 pattern numbers (least-squares fit) and the k
    largest coefficients of the orthonormal DCT of what the pattern leaves.

    Data-aware encoding: ``calibration`` is a tensor of SAMPLE INPUTS of this layer, X [n, in]
    (leading dimensions are flattened; any float dtype, any device). Alternatively pass their
    second moment as ``second_moment=H`` with H = X^T X / n [in, in] (not both). The positions and
    the kept values are then chosen to minimize the output error ||(W - W_rbe) X^T|| instead of the
    weight error (rbe_ffn/calibrate.py has the method; ``select`` = "obs" (default, SparseGPT-like
    selection with error compensation) or "diag"; ``damp``: ridge damp * mean(diag H) added to H).
    The 8 pattern numbers are the plain encoder's. Each block row keeps the plain encoding where
    that is better on the calibration data, so ``output_error <= output_error_plain`` always.
    Without calibration data the plain encoder runs, unchanged.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty: shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"weight must be float32 or float64, got {weight.dtype}")
    check_sizes(block_size, k)
    h = None
    if calibration is not None or second_moment is not None:
        from . import calibrate
        if calibration is not None and second_moment is not None:
            raise ValueError("give either calibration (sample inputs X [n, in]) or second_moment (X^T X / n), not both")
        if select not in calibrate.SELECT:
            raise ValueError(f"select must be one of {calibrate.SELECT}, got {select!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (damp > 0 and math.isfinite(damp)):
            raise ValueError(f"damp must be a positive number, got {damp!r}")
        if calibration is not None:
            h, _ = calibrate.second_moment(calibration, weight.shape[1])
        else:
            h = calibrate.check_moment(second_moment, weight.shape[1])
    # contiguous here (the encoder copies a strided input anyway) so that the norm below is
    # summed in the same order as for a contiguous copy: a transposed view then gives a
    # bitwise-identical relative_error, not one that differs in the last bit
    w = weight.detach().contiguous()
    basis, coeffs, index, err = ops.encode(w, block_size, k)
    total = w.double().pow(2).sum().item()
    dropped = err.sum().item()
    # Finite weights near the dtype's maximum give infinite pattern/DCT values (a block's DCT
    # coefficient reaches b x its largest entry) or an error measure that overflows float64
    # (squares of |w| > ~1e154): refuse them rather than return inf coefficients with
    # relative_error inf/nan. (Scaling by a power of two is exact only without underflow, and
    # the stored numbers of such a block would overflow the dtype anyway.)
    if not (bool(torch.isfinite(basis).all()) and bool(torch.isfinite(coeffs).all())):
        raise ValueError(f"rbe_ffn.compress: the weight's RBE coefficients overflow {w.dtype} (largest |weight| "
                         f"{w.abs().max().item():.3g}; a block's coefficients reach up to block_size = {block_size} "
                         f"times its largest entry): scale the weight down before compressing (and the layer's "
                         f"output back up){' or compress it as float64 (weight.double())' if w.dtype != torch.float64 else ''}")
    if not (math.isfinite(total) and math.isfinite(dropped)):
        raise ValueError(f"rbe_ffn.compress: the squared error of the encoding overflows float64 (largest |weight| "
                         f"{w.abs().max().item():.3g}; squares overflow above ~1e154): scale the weight down "
                         f"before compressing")
    rel = math.sqrt(dropped / total) if total > 0 else math.sqrt(dropped)
    plain = CompressedWeight(basis, coeffs, index, tuple(w.shape), block_size, rel, err)
    if h is None:
        return plain
    from .calibrate import encode_calibrated
    basis, coeffs, index, err, out_err, out_plain, n_plain = encode_calibrated(w, block_size, k, h, plain, damp,
                                                                              select)
    rel = math.sqrt(err.sum().item() / total) if total > 0 else math.sqrt(err.sum().item())
    return CompressedWeight(basis, coeffs, index, tuple(w.shape), block_size, rel, err, out_err, out_plain, n_plain)


def decompress(basis: torch.Tensor, coeffs: torch.Tensor, index: torch.Tensor, shape, block_size: int) -> torch.Tensor:
    """Decode RBE tensors into a dense [out, in] matrix (for tests and inspection)."""
    # validate instead of int()-truncating: decompress(..., block_size=8.5) used to decode
    # silently at b=8, and a 3-element shape failed with an unpacking error. operator.index
    # accepts any integer (int, numpy or 0-d torch integers) and refuses floats.
    try:
        if isinstance(block_size, bool):
            raise TypeError
        b = operator.index(block_size)
    except TypeError:
        raise ValueError(f"block_size must be an int in [4, 256], got {block_size!r}") from None
    try:
        dims = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be (out_features, in_features) as two ints, got {shape!r}") from None
    if len(dims) != 2:
        raise ValueError(f"shape must be (out_features, in_features) as two ints, got {shape!r}")
    return ops.decode(basis, coeffs, index, dims[0], dims[1], b)
