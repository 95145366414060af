"""Initialisation of the shared projections: uniform (Haar) orthogonal, or VeRA's Kaiming-uniform.

Everything is drawn on the CPU from an explicitly seeded `torch.Generator`, so the same seed gives
bit-identical projections on every machine and every rank, whatever device the model lives on.
"""

from __future__ import annotations

import hashlib
import math

import torch

PROJECTION_INITS = ("orthogonal", "kaiming")


def haar_orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows × cols) float32 matrix drawn from the Haar measure on semi-orthogonal matrices.

    Rows are orthonormal when rows ≤ cols, columns otherwise. A Gaussian matrix is
    orthonormalised by QR, and each column of Q is multiplied by the sign of the matching diagonal
    entry of R: without that correction QR's sign convention biases the distribution (Mezzadri 2007).
    The QR runs in float64 so that orthonormality holds to ~1e-7 after the cast to float32.
    """
    tall, short = max(rows, cols), min(rows, cols)
    gauss = torch.randn((tall, short), generator=generator, dtype=torch.float32).double()
    q, r = torch.linalg.qr(gauss, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    q = q * signs.unsqueeze(0)
    out = q if rows >= cols else q.T
    return out.contiguous().float()


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """VeRA's Kaiming-uniform init (fan-in = cols, gain √2), kept for the ablation."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)
    return torch.empty((rows, cols)).uniform_(-bound, bound, generator=generator)


def init_projection_pair(
    r: int, in_features: int, out_features: int, seed: int, method: str = "orthogonal"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (A, B) of shapes (r × in_features) and (out_features × r) from one generator seeded with `seed`.

    A is drawn first, then B, from the same stream (as VeRA does), so the pair is a function of the seed.
    """
    if method not in PROJECTION_INITS:
        raise ValueError(f"projection_init must be one of {PROJECTION_INITS}, got {method!r}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    draw = haar_orthogonal if method == "orthogonal" else kaiming_uniform
    a = draw(r, in_features, generator)
    b = draw(out_features, r, generator)
    return a, b


def derived_seed(seed: int, index: int) -> int:
    """A 63-bit seed for the `index`-th draw of a stream rooted at `seed` (re-initialisation targets).

    Hashing (rather than `seed + index`) keeps streams of neighbouring seeds from overlapping.
    """
    digest = hashlib.sha256(f"uora-reinit:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
