"""Quantized weights as plain data: the form a quantizer returns and a quantized source (a GGUF) already holds.

It lives below both the model sources and the quantizers so that each can hand it on without importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """``weight ≈ scale * (qdata - zero_point)`` per group of ``group_size`` input columns."""

    qdata: torch.Tensor  # int8 [N, K], values in [qmin, qmax]
    scale: torch.Tensor  # float32 [N, K // group]
    zero_point: torch.Tensor | None  # int8 [N, K // group] (asymmetric) or None (symmetric)
    bits: int
    group_size: int
    # The first rows stored at 8 bits per row instead (a tied table's most frequent tokens; see TensorQuant's
    # ``int8_rows``). This tensor's own values for those rows are then unused and not stored.
    int8_rows: QuantizedWeight | None = None

    def dequantize(self) -> torch.Tensor:
        zero = 0 if self.zero_point is None else expand_groups(self.zero_point.float(), self.group_size)
        full = (self.qdata.float() - zero) * expand_groups(self.scale, self.group_size)
        if self.int8_rows is not None:
            full[: self.int8_rows.qdata.shape[0]] = self.int8_rows.dequantize()
        return full

    def tail(self) -> QuantizedWeight:
        """The rows this tensor stores at its own width: all of them, or those after ``int8_rows``."""
        n = 0 if self.int8_rows is None else self.int8_rows.qdata.shape[0]
        zero = None if self.zero_point is None else self.zero_point[n:]
        return QuantizedWeight(self.qdata[n:], self.scale[n:], zero, self.bits, self.group_size)


def expand_groups(per_group: torch.Tensor, group: int) -> torch.Tensor:
    """One value per group of ``group`` columns, repeated across the columns it covers."""
    return per_group.repeat_interleave(group, dim=-1)
