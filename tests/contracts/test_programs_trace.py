"""The TorchScript trace a checked program runs on the CPU: used only where it equals the exported module."""

from __future__ import annotations

import io

import torch

from recsys_contracts.programs import CheckedProgram


class _Scorer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, item_idx: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.table(item_idx) * weight[:, None]             # (N, 4)
        return self.head(hidden).squeeze(1), hidden.sum(dim=1)      # (N,), (N,)


class _Noisy(torch.nn.Module):
    def forward(self, item_idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight + torch.rand_like(weight)                     # a trace would not repeat the draws


class _Reshaper(torch.nn.Module):
    def forward(self, item_idx: torch.Tensor) -> torch.Tensor:
        return item_idx.float().view(item_idx.shape[0] // 2, 2).sum(dim=1)   # shape arithmetic


def _export(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """Exported without example inputs, saved and loaded again: what the services load (trainer/export.py)."""
    n = torch.export.Dim("n", min=1, max=64)
    shapes = {name: {0: 2 * n if module.__class__ is _Reshaper else n} for name in inputs}
    program = torch.export.export(module.eval(), (), inputs, dynamic_shapes=shapes)
    program.example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def test_a_straight_line_program_runs_traced_with_the_exported_modules_outputs():
    checked = CheckedProgram(_export(_Scorer(), {"item_idx": torch.tensor([1, 2]), "weight": torch.ones(2)}))
    assert checked.__dict__["_traced"] is not None
    for n in (1, 5, 64):
        inputs = {"item_idx": torch.arange(n) % 10, "weight": torch.linspace(-1, 1, n)}
        with torch.no_grad():
            for got, expected in zip(checked(**inputs), checked.program(**inputs)):
                assert torch.equal(got, expected)
    assert len(list(checked.parameters())) == 3                     # the trace is not a second module


def test_shape_arithmetic_keeps_the_exported_module():
    checked = CheckedProgram(_export(_Reshaper(), {"item_idx": torch.arange(4)}))
    assert checked.specs is None or checked.__dict__["_traced"] is None
    assert torch.equal(checked(item_idx=torch.arange(6)), torch.tensor([1.0, 5.0, 9.0]))


def test_moving_the_program_redoes_the_trace_for_the_new_placement():
    checked = CheckedProgram(_export(_Scorer(), {"item_idx": torch.tensor([1, 2]), "weight": torch.ones(2)}))
    before = checked.__dict__["_traced"]
    checked.to(torch.float64)                 # parameters change: the old trace would be stale
    assert checked.__dict__["_traced"] is not before
    checked.to("meta")                        # off the CPU: no trace, the exported module serves
    assert checked.__dict__["_traced"] is None


def test_a_program_with_python_input_guards_keeps_the_exported_module():
    n = torch.export.Dim("n", min=1, max=64)
    inputs = {"item_idx": torch.tensor([1, 2]), "weight": torch.ones(2)}
    program = torch.export.export(_Scorer().eval(), (), inputs, dynamic_shapes={k: {0: n} for k in inputs})
    checked = CheckedProgram(program)        # in memory, example inputs kept: module() calls a guard submodule
    assert checked.__dict__["_traced"] is None
    with torch.no_grad():
        assert checked(**inputs)[0].shape == (2,)


def test_a_trace_that_differs_from_the_exported_module_is_not_used_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="recsys_contracts.programs"):
        checked = CheckedProgram(_export(_Noisy(), {"item_idx": torch.tensor([1, 2]), "weight": torch.ones(2)}))
    assert checked.specs is not None and checked.__dict__["_traced"] is None
    assert "program runs untraced (slower): its trace's outputs differ" in caplog.text
    assert checked(item_idx=torch.tensor([1, 2, 3]), weight=torch.zeros(3)).shape == (3,)
