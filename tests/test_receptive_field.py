"""Receptive fields from the graph against hand-computed windows and against autograd.

Each tiny torch net returns the feature map under test as its ONNX output ("logits"), so the
field is asked of that tensor. Hand values follow the recursion of gap_service/atlas/receptive.py
written out per layer in the comments: (size, jump, start) of unit 0, unit u sees
[start + u*jump, start + u*jump + size).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gap_service import Explainer
from gap_service.atlas import NotAnalysable, ReceptiveField, receptive_fields
from support.models import TorchCase, export_onnx

SIZE = 32


class Net(nn.Module):
    """A net from a forward function, for one-line cases."""

    def __init__(self, forward, **layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self.layers, x)


def conv(k: int, stride: int = 1, padding: int = 0, dilation: int = 1, channels: tuple[int, int] = (3, 3)) -> nn.Conv2d:
    return nn.Conv2d(*channels, k, stride=stride, padding=padding, dilation=dilation)


def sequential(*layers: nn.Module) -> Net:
    return Net(lambda m, x: m["body"](x), body=nn.Sequential(*layers))


# name -> (net, {unit: (top, left, bottom, right)})
CASES = {
    # conv k3 s2 p1: (3, 2, -1); again: (3 + 2*2, 4, -1 - 1*2) = (7, 4, -3)
    "strided_convs": (sequential(conv(3, 2, 1), conv(3, 2, 1)),
                      {(0, 0): (0, 0, 4, 4), (3, 5): (9, 17, 16, 24), (7, 7): (25, 25, 32, 32)}),
    # conv k3 p0: (3, 1, 0); maxpool k2 s2: (3 + 1, 2, 0)
    "conv_maxpool": (sequential(conv(3), nn.MaxPool2d(2)), {(0, 0): (0, 0, 4, 4), (2, 3): (4, 6, 8, 10)}),
    # avgpool k3 s2 p1: (3, 2, -1); conv k3 s1 p1: (3 + 2*2, 2, -1 - 2) = (7, 2, -3)
    "avgpool_conv": (sequential(nn.AvgPool2d(3, 2, 1), conv(3, 1, 1)), {(0, 0): (0, 0, 4, 4), (5, 6): (7, 9, 14, 16)}),
    # conv k3 d2 p2: (1 + 2*2, 1, -2) = (5, 1, -2); conv k3: (7, 1, -2)
    "dilation": (sequential(conv(3, 1, 2, 2), conv(3)), {(5, 5): (3, 3, 10, 10), (0, 1): (0, 0, 5, 6)}),
    # F.pad left 2, right 0, top 1, bottom 3 -> start (rows -1, cols -2); conv k3: (3, 1, start)
    "explicit_pad": (Net(lambda m, x: m["conv"](F.pad(x, (2, 0, 1, 3))), conv=conv(3)),
                     {(0, 0): (0, 0, 2, 1), (4, 6): (3, 4, 6, 7)}),
    # stride 2 conv k4 p1 then k5 dilation 3 stride 2 p0: (4, 2, -1) -> (4 + 12*2, 4, -1) = (28, 4, -1)
    "strided_dilated": (sequential(conv(4, 2, 1), conv(5, 2, 0, 3)), {(0, 0): (0, 0, 27, 27), (1, 0): (3, 0, 31, 27)}),
    # residual: conv k3 p1 + identity: union of (3, 1, -1) and (1, 1, 0) = (3, 1, -1)
    "residual": (Net(lambda m, x: x + m["conv"](x), conv=conv(3, 1, 1)), {(4, 4): (3, 3, 6, 6)}),
}


def field_of(net: nn.Module, name: str) -> ReceptiveField | NotAnalysable:
    case = TorchCase(f"receptive_{name}", net.eval(), (1, 3, SIZE, SIZE))
    nm = Explainer(export_onnx(case)).compiled().nm
    return receptive_fields(nm, ["logits"])["logits"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_boxes_equal_hand_computed_fields(name: str) -> None:
    net, boxes = CASES[name]
    field = field_of(net, name)
    assert isinstance(field, ReceptiveField), field
    for unit, box in boxes.items():
        assert field.box(unit, SIZE, SIZE) == box, (name, unit)


def gradient_support(net: nn.Module, unit: tuple[int, int], channel: int = 0) -> tuple[int, int, int, int]:
    """Bounding box of the input pixels with a non-zero gradient for one output unit."""
    x = torch.zeros(1, 3, SIZE, SIZE, requires_grad=True)
    net(x)[0, channel, unit[0], unit[1]].backward()
    rows, cols = np.nonzero(x.grad.abs().sum(dim=(0, 1)).numpy())
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def linear_net() -> nn.Module:
    """No non-linearity and positive weights: every pixel of the field has a non-zero gradient."""
    torch.manual_seed(0)
    net = sequential(conv(3, 2, 1), nn.AvgPool2d(2, 1), conv(3, 1, 2, 2), nn.BatchNorm2d(3), conv(5, 2, 2),
                     nn.AvgPool2d(3, 2, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(0.1, 1.0)
    return net.eval()


def test_boxes_equal_the_gradient_support_of_a_deep_linear_net() -> None:
    net = linear_net()
    field = field_of(net, "linear_deep")
    assert isinstance(field, ReceptiveField), field
    units = [(0, 0), (1, 2), (2, 1), (3, 3)]
    assert [field.box(u, SIZE, SIZE) for u in units] == [gradient_support(net, u) for u in units]


def test_conv_transpose_box_covers_the_gradient_support_within_rounding() -> None:
    torch.manual_seed(0)
    net = sequential(conv(3, 4, 1), nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1))
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(0.1, 1.0)
    field = field_of(net, "conv_transpose")
    assert isinstance(field, ReceptiveField), field
    for unit in [(3, 3), (4, 5), (6, 2)]:
        top, left, bottom, right = field.box(unit, SIZE, SIZE)
        t, l, b, r = gradient_support(net, unit)
        assert top <= t and left <= l and bottom >= b and right >= r
        assert max(t - top, l - left, bottom - b, right - r) <= 2  # input jump 4 x (stride 2 - 1) / stride 2


def test_squeeze_excitation_gate_adds_global_context_not_width() -> None:
    def forward(m, x):
        y = m["conv"](x)
        return y * torch.sigmoid(m["gate"](F.adaptive_avg_pool2d(y, 1)))

    field = field_of(Net(forward, conv=conv(3, 1, 1), gate=nn.Conv2d(3, 3, 1)), "squeeze_excitation")
    assert isinstance(field, ReceptiveField) and field.global_context
    assert field.box((4, 4), SIZE, SIZE) == (3, 3, 6, 6)


def test_a_path_through_resize_is_not_analysable_and_says_where() -> None:
    net = Net(lambda m, x: m["conv"](F.interpolate(x, scale_factor=2.0, mode="nearest")), conv=conv(3))
    field = field_of(net, "resize")
    assert isinstance(field, NotAnalysable)
    assert "Resize node" in field.reason and "no receptive-field rule" in field.reason


def test_reflect_padding_is_not_analysable() -> None:
    field = field_of(Net(lambda m, x: m["conv"](F.pad(x, (1, 1, 1, 1), mode="reflect")), conv=conv(3)), "reflect")
    assert isinstance(field, NotAnalysable) and "reflect padding" in field.reason
