"""U-Net for 2-D and 3-D: configurable depth, width and normalisation, with its exact receptive field.

Our own module rather than MONAI's: a few dozen lines, no extra dependency, and the layer list
is known exactly, so the receptive field (how far an output pixel looks in each direction) is
computed by interval arithmetic over the very layers built here and declared as the segmenter's
halo. Normalisation is ``batch`` (a per-channel affine map at inference) or ``none``: both are
local, so an output pixel depends only on its receptive field. Instance and group norms are
refused: they normalise by statistics of whatever window is fed in, a per-tile statistic that
draws seams.

Shape rule: each level halves the size (max-pool 2), so the network is equivariant only to
shifts by multiples of ``2**depth`` (:attr:`UNet.align`). :meth:`UNet.forward` pads the end of
each spatial axis with zeros to a multiple of ``align`` and crops back.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["batch", "none"]
NORMS: tuple[str, ...] = ("batch", "none")


def _layers(spatial_dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module]]:
    if spatial_dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.BatchNorm2d
    if spatial_dims == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.BatchNorm3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class _Block(nn.Sequential):
    """Two (conv 3, norm, ReLU) layers."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, norm: str) -> None:
        conv, _, _, bn = _layers(spatial_dims)
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(conv(c, cout, kernel_size=3, padding=1, bias=norm == "none"))
            if norm == "batch":
                layers.append(bn(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """Encoder of ``depth`` down-steps (width doubling), decoder with skip connections, 1x1 head."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        depth: int = 3,
        width: int = 16,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(
                f"norm {norm!r} is not supported: use one of {NORMS} (instance/group norms use "
                "per-window statistics, which make tiled inference differ from whole-image inference)"
            )
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        conv, up, pool, _ = _layers(spatial_dims)
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.config = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "depth": depth,
            "width": width,
            "norm": norm,
        }
        widths = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(
            [
                _Block(spatial_dims, in_channels if i == 0 else widths[i - 1], widths[i], norm)
                for i in range(depth + 1)
            ]
        )
        self.pool = pool(2)
        self.up = nn.ModuleList([up(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in range(depth)])
        self.dec = nn.ModuleList([_Block(spatial_dims, 2 * widths[i], widths[i], norm) for i in range(depth)])
        self.head = conv(widths[0], out_channels, kernel_size=1)

    @property
    def align(self) -> int:
        """Shifts the network is equivariant to: multiples of ``2**depth``."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, out_channels, *spatial)`` for ``x`` ``(N, in_channels, *spatial)``, any size."""
        spatial = x.shape[2:]
        pad: list[int] = []
        for size in reversed(spatial):
            pad += [0, (-size) % self.align]
        if any(pad):
            x = F.pad(x, pad)
        return self.forward_aligned(x)[(slice(None), slice(None), *(slice(0, s) for s in spatial))]

    def forward_aligned(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an input whose spatial sizes are multiples of :attr:`align` (no padding).

        This is the graph that exports (TorchScript, ONNX) with free input sizes.
        """
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for i in reversed(range(self.depth)):
            x = self.dec[i](torch.cat([skips[i], self.up[i](x)], dim=1))
        return self.head(x)


def receptive_extent(depth: int) -> tuple[int, int]:
    """How far ``(before, after)`` an output pixel of :class:`UNet` looks, worst case over alignment.

    Interval arithmetic over the layers, per output position modulo ``2**depth``: a 3-conv widens an
    interval by 1 at its level; max-pool 2 maps level ``i+1`` interval ``[a, b]`` to ``[2a, 2b+1]``;
    the stride-2 transposed conv maps output ``[a, b]`` to input ``[a // 2, b // 2]``; a decoder
    level sees the union of its skip and its up path.
    """

    def enc(level: int, a: int, b: int) -> tuple[int, int]:
        # encoder block at ``level`` (two convs) back to the network input
        a, b = a - 2, b + 2
        if level == 0:
            return a, b
        return enc(level - 1, 2 * a, 2 * b + 1)

    def dec(level: int, a: int, b: int) -> tuple[int, int]:
        # decoder output at ``level`` (bottom = encoder's deepest block) back to the input
        if level == depth:
            return enc(depth, a, b)
        a, b = a - 2, b + 2
        skip = enc(level, a, b)
        below = dec(level + 1, a // 2, b // 2)
        return min(skip[0], below[0]), max(skip[1], below[1])

    before = after = 0
    for p in range(2**depth):
        a, b = dec(0, p, p)
        before, after = max(before, p - a), max(after, b - p)
    return before, after


def receptive_field(depth: int) -> int:
    """Full width of the receptive field: ``before + after + 1``."""
    before, after = receptive_extent(depth)
    return before + after + 1


def build_unet(config: dict[str, object]) -> UNet:
    """A :class:`UNet` from a model card's ``architecture`` mapping."""
    return UNet(**config)  # type: ignore[arg-type]
