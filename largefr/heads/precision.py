"""Storage precision of the class-sized state (head.weight_dtype), and float32 arithmetic on the rows a step uses.

With head.weight_dtype 'bf16' the classifier W, its row-sparse optimizer's per-row state and the cluster bank's
centers are stored in bfloat16 (half the bytes of the state that grows with the class count). Nothing is computed
in bfloat16 because of it: the rows a step reads are gathered first, then upcast (`upcast`; the whole tensor never
is), and computed in float32 (the logits GEMM in head.logits_dtype). With 'fp32' every helper here returns its
input unchanged: no copy, the same bits as before the setting existed.

Writing float32 rows back into bfloat16 storage rounds them to 8 significant bits (spacing 2^-7 to 2^-8 of the
value). Round-to-nearest would lose every update smaller than half of that, and the shipped configs make such
updates every step: weight decay shrinks W by lr * weight_decay = 0.1 * 5e-4 = 5e-5 of itself per SGD step
(1e-6 under the quickstart's AdamW), and Adam's exp_avg_sq decays by 1 - beta2 = 1e-3 of itself, all below
bf16's half spacing of at least 2^-9 = 1.95e-3. Rounded to nearest, W would never decay and exp_avg_sq never
shrink. The optimizer therefore writes with stochastic rounding (`round_to_storage`): up or down with
probabilities that make the stored value's expectation the float32 value, so small updates accumulate on
average. The random bits come from a counter-based hash of (row, that row's step count, which tensor, column):
no generator state, so a resumed run rounds exactly as an uninterrupted one would.
"""
from __future__ import annotations

import torch

from largefr.choices import TORCH_DTYPE_NAMES, WEIGHT_DTYPES

STORAGE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, TORCH_DTYPE_NAMES[name]) for name in WEIGHT_DTYPES}
"""head.weight_dtype -> the torch dtype W, its optimizer rows and the bank's centers are stored in."""
LOW_PRECISION = (torch.bfloat16, torch.float16)
_MASK32 = 0xFFFF_FFFF
_LOW_HALF = 0xFFFF  # the float32 bits below bfloat16's mantissa


def compute_dtype(storage: torch.dtype) -> torch.dtype:
    """The dtype rows stored as `storage` are computed in: float32 for half-precision storage, else itself."""
    return torch.float32 if storage in LOW_PRECISION else storage


def upcast(rows: torch.Tensor) -> torch.Tensor:
    """`rows` in their compute dtype: a float32 copy of half-precision rows, else `rows` itself (no copy)."""
    return rows.to(compute_dtype(rows.dtype))


ROUNDING_CHUNK_ELEMENTS = 1 << 20
"""Elements rounded at a time: the hash's int64 temporaries (`ROUNDING_TEMPORARY_BYTES` each element) stay a few
MiB whatever the optimizer's block."""
ROUNDING_TEMPORARY_BYTES = 8 + 8 + 4
"""Per element of a chunk being rounded, at the peak: the int64 hash, its shifted copy and the int32 noise."""


def round_to_storage(values: torch.Tensor, storage: torch.Tensor, row_keys: torch.Tensor) -> torch.Tensor:
    """(n, ...) float32 `values` in `storage`'s dtype: stochastically rounded for bfloat16 storage, else cast.

    row_keys: (n,) int64, different at every write of a row (`rounding_keys`): they seed the random bits.
    """
    if storage.dtype != torch.bfloat16 or values.dtype != torch.float32:
        return values.to(storage.dtype)
    values = values.contiguous()
    out = torch.empty(values.shape, dtype=torch.bfloat16, device=values.device)
    width = values[0].numel() if values.shape[0] else 1
    rows_per_chunk = max(1, ROUNDING_CHUNK_ELEMENTS // width)
    for start in range(0, values.shape[0], rows_per_chunk):
        chunk = slice(start, start + rows_per_chunk)
        out[chunk] = _round_stochastically(values[chunk], row_keys[chunk], width)
    return out


def _round_stochastically(values: torch.Tensor, row_keys: torch.Tensor, width: int) -> torch.Tensor:
    noise = _noise16(row_keys, width).view(values.shape)
    # adding u ~ U[0, 2^16) to the low bits and truncating them rounds the magnitude up with probability
    # (low bits) / 2^16: exactly the distance to the lower bfloat16 neighbour, in units of their spacing
    truncated = (values.view(torch.int32) + noise).bitwise_and_(~_LOW_HALF).view(torch.float32)
    truncated = torch.where(torch.isnan(values), values, truncated)  # a NaN's low bits may carry into the sign
    return truncated.to(torch.bfloat16)  # exact: the low bits are zero


def rounding_keys(rows: torch.Tensor, step_counts: torch.Tensor, salt: int) -> torch.Tensor:
    """(n,) keys of one write: the local row, its optimizer step count (changes at every step of the row) and a
    salt naming the tensor written (W, momentum, ...), mixed into 32 bits."""
    counter = _mix32_((step_counts.to(torch.int64) * 8 + salt) & _MASK32)
    return _mix32_(counter.bitwise_xor_(rows & _MASK32))


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2^32), in place on `x` (a tensor the caller owns): xor-shift /
    multiply rounds whose products stay below 2^63 (constants below 2^31), so no step relies on integer overflow."""
    x.bitwise_xor_(x >> 16).mul_(0x7FEB_352D).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15).mul_(0x5BD1_E995).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def _noise16(row_keys: torch.Tensor, width: int) -> torch.Tensor:
    """(n * width,) int32 values uniform in [0, 2^16): the high half of a hash of (row key, column)."""
    columns = torch.arange(width, dtype=torch.int64, device=row_keys.device) * 0x9E37_79B9
    mixed = _mix32_((row_keys.unsqueeze(1) + columns).bitwise_and_(_MASK32))
    return (mixed >> 16).to(torch.int32).reshape(-1)
