"""The split network: a backbone cut into K gradient-isolated local modules.

A data type only: `localearn.build.build_network` makes one from the registry (the backbone, the
first registered splitter that accepts it, the K the rule agrees to, then ``rule.configure``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

Shape = tuple[int, ...]


class SplitNetwork(nn.Module):
    """A backbone cut into K local modules; ``forward`` equals the unsplit backbone's forward.

    ``units`` are the backbone's units in order (stem first), shared with the modules, so a
    rule can look up or copy later blocks; ``unit_ranges[i]`` lists the units of module i.
    ``feature_shapes[i]`` is the output shape (C, H, W) of module i for i < K-1.
    ``model_name`` (the registry name, "" when unknown), ``split`` (the policy) and ``cuts``
    (the unit index where each module after the first starts) say how it was made.
    """

    def __init__(
        self,
        units: Sequence[nn.Module],
        classifier: nn.Module,
        cuts: Sequence[int],
        input_shape: tuple[int, int, int],
        *,
        model_name: str = "",
        split: str = "even",
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model_name, self.split, self.cuts = model_name, split, list(cuts)
        self._backbone = (backbone,)  # a tuple: its modules are this network's, counted once
        bounds = [0, *cuts, len(units)]
        self.unit_ranges = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        groups: list[nn.Module] = []
        for i, r in enumerate(self.unit_ranges):
            parts = [units[j] for j in r]
            if i == len(self.unit_ranges) - 1:
                parts.append(classifier)
            groups.append(nn.Sequential(*parts))
        self.local_modules = nn.ModuleList(groups)
        self.units = list(units)  # plain list: the parameters are registered once, above
        self.input_shape = input_shape
        self.unit_shapes = self._trace_shapes(input_shape)
        self.feature_shapes = [self.unit_shapes[r[-1]] for r in self.unit_ranges[:-1]]

    @property
    def backbone(self) -> nn.Module | None:
        """The unsplit backbone (its modules are this network's own), when the splitter kept
        it: its ``state_dict`` has the plain model's parameter names."""
        return self._backbone[0]

    @property
    def k(self) -> int:
        return len(self.local_modules)

    def _trace_shapes(self, input_shape: tuple[int, int, int]) -> list[Shape]:
        """Output shape of every unit, found by one forward pass on a dummy batch."""
        was_training = self.training
        self.eval()
        shapes: list[Shape] = []
        param = next(self.parameters())
        with torch.no_grad():
            x = torch.zeros(2, *input_shape, device=param.device, dtype=param.dtype)
            for unit in self.units:
                x = unit(x)
                shapes.append(tuple(x.shape[1:]))
        self.train(was_training)
        return shapes

    def forward(self, x: Tensor) -> Tensor:
        for module in self.local_modules:
            x = module(x)
        return x
