"""A ViT boundary seen as a feature map: the patch tokens of a (T, D) sequence laid back on their
grid, (D, h, w), with the prefix tokens (class, registers) left out.

Heads designed for (C, H, W) maps (InfoPro's decoder and classifier, HPFF's patch fusion, the
public DGL head) run on a transformer through `on_grid`: the head is built for the grid's shape
and sees every boundary through `TokenGrid.view`. The view is a slice, a transpose and a
reshape: no arithmetic, and the gradient reaches every patch token (none reaches the prefix
tokens from such a head).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from localearn.errors import UserError
from localearn.interfaces import AuxHead, Shape


@dataclass(frozen=True)
class TokenGrid:
    """``prefix`` tokens, then ``height * width`` patch tokens in row-major order."""

    prefix: int
    height: int
    width: int

    def map_shape(self, shape: Shape) -> tuple[int, int, int]:
        """(T, D) -> (D, height, width); a sequence of another length is a `ValueError`."""
        tokens, dim = shape
        if tokens != self.prefix + self.height * self.width:
            raise ValueError(f"{tokens} tokens do not hold {self.prefix} prefix tokens and a "
                             f"{self.height}x{self.width} grid of patches")
        return dim, self.height, self.width

    def view(self, tokens: Tensor) -> Tensor:
        """(N, T, D) -> (N, D, height, width)."""
        n, _, d = tokens.shape
        return tokens[:, self.prefix:].transpose(1, 2).reshape(n, d, self.height, self.width)


def token_grid(net: nn.Module) -> TokenGrid | None:
    """The grid of a split transformer's boundaries (its stem says), or None: a network whose
    boundaries are feature maps, or a ViT whose token count varies (patch dropout)."""
    units = getattr(net, "units", None)
    stem = units[0] if units else None
    grid = getattr(stem, "token_grid", None)
    return grid(net.input_shape) if callable(grid) else None


def require_grid(grid: TokenGrid | None, who: str, needs: str, model: str,
                 shape: Shape) -> TokenGrid:
    """``grid``, or one `UserError` line: ``who`` (``needs`` a fixed patch grid) cannot train
    ``model``, whose (T, D) boundaries of ``shape`` have none."""
    if grid is None:
        raise UserError(f"{who} cannot train model {model or 'this model'!r}: {needs}, and "
                        f"this model's (T, D) boundaries {tuple(shape)} have no fixed patch "
                        "grid (patch dropout?); turn patch dropout off or use dgl")
    return grid


class GridHead(AuxHead):
    """A feature-map head run on the patch grid of a (T, D) boundary (a loss-only head)."""

    def __init__(self, inner: AuxHead, grid: TokenGrid, shape: Shape) -> None:
        super().__init__(shape, inner.info)
        self.inner, self.grid = inner, grid

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return self.inner.loss(self.grid.view(features), targets, images)

    def compile_parts(self) -> list[nn.Module]:
        return self.inner.compile_parts()


class GridLogitHead(GridHead):
    """`GridHead` for a head with a ``forward`` (logits): it keeps one."""

    def forward(self, features: Tensor) -> Tensor:
        return self.inner(self.grid.view(features))


def on_grid(inner: AuxHead, grid: TokenGrid, shape: Shape) -> GridHead:
    """``inner`` (built for ``grid.map_shape(shape)``) run on (T, D) boundaries of ``shape``."""
    logits = type(inner).forward is not nn.Module.forward
    return (GridLogitHead if logits else GridHead)(inner, grid, shape)
