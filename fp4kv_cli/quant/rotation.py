"""Q/K Hadamard rotation: K is stored rotated, attention scores are unchanged.

Within each block of ``block`` channels of a head, ``x -> x @ H`` with ``H`` the normalized
Sylvester (natural order) Walsh-Hadamard matrix, ``H[i, j] = (-1)^popcount(i & j) / sqrt(block)``:
symmetric and orthogonal, so ``H @ H = I`` and ``(q H) . (k H) = q . k``. ``block`` 16 matches one
NVFP4 scale block (SGLang's ``--qkrot-block 16``); ``block == head_dim`` is the full-head rotation
(ModelOpt's ``NVFP4_KV_ROTATE_CFG``: ``rotate: True`` on the Q and K quantizers). Both engines
rotate Q and K after RoPE and leave V alone, as this core does.

With K centering the order is center, then rotate: the cache stores ``(K - k_offset) @ H``
(``k_offset`` stays in the unrotated basis). The math runs in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fp4kv_cli.errors import FP4KVError

#: ``kind`` recorded in scales files and exports for this rotation.
HADAMARD = "hadamard"


@functools.cache
def hadamard_matrix(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix ``[size, size]`` float32 (``size`` a power of 2)."""
    if size < 1 or size & (size - 1):
        raise FP4KVError(f"a Hadamard rotation block must be a power of 2, got {size}")
    index = torch.arange(size)
    parity = torch.zeros(size, size, dtype=torch.int64)
    bits = index[:, None] & index[None, :]
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    signs = 1.0 - 2.0 * parity.to(torch.float64)
    return (signs / size**0.5).to(dtype=torch.float32, device=device)


@dataclass(frozen=True)
class QKRotation:
    """A block Hadamard rotation of the last (head_dim) axis, ``block`` channels a block."""

    block: int

    def __post_init__(self) -> None:
        if self.block < 2 or self.block & (self.block - 1):
            raise FP4KVError(f"--qk-rotation block must be a power of 2 >= 2, got {self.block}")

    @classmethod
    def parse(cls, text: str, head_dim: int | None = None) -> QKRotation:
        """``"16"`` or ``"head_dim"`` (the full head, needs ``head_dim``) as a rotation."""
        value = text.strip().lower()
        if value in ("head_dim", "full"):
            if head_dim is None:
                raise FP4KVError("--qk-rotation head_dim needs the model's head_dim")
            return cls(head_dim)
        try:
            block = int(value)
        except ValueError:
            raise FP4KVError(
                f"--qk-rotation must be a block size (e.g. 16) or head_dim, got {text!r}"
            ) from None
        return cls(block)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise :class:`FP4KVError` unless the blocks tile ``head_dim``."""
        if head_dim % self.block:
            raise FP4KVError(
                f"--qk-rotation block {self.block} does not divide head_dim {head_dim}; use 16 or head_dim"
            )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., head_dim]`` rotated block by block, as float32 (``H`` is its own inverse, so this
        also rotates back)."""
        self.check_head_dim(x.shape[-1])
        h = hadamard_matrix(self.block, x.device)
        blocks = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // self.block, self.block)
        return (blocks @ h).reshape(x.shape)

    def to_dict(self) -> dict[str, object]:
        """The rotation as scales files and exports record it."""
        return {"kind": HADAMARD, "block": self.block}

    @classmethod
    def from_dict(cls, data: object, what: str = "k_rotation") -> QKRotation | None:
        """Inverse of :meth:`to_dict` (None for a missing / null entry)."""
        if data is None:
            return None
        if (
            not isinstance(data, dict)
            or data.get("kind") != HADAMARD
            or not isinstance(data.get("block"), int)
        ):
            raise FP4KVError(
                f"{what} is {data!r}; expected {{'kind': 'hadamard', 'block': int}} (fp4kv calibrate --qk-rotation)"
            )
        return cls(data["block"])


__all__ = ["HADAMARD", "QKRotation", "hadamard_matrix"]
