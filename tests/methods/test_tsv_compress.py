"""`tsv_compress` (METHODS.md section 6)."""

from __future__ import annotations

import pytest
import torch

from merge_service.errors import InvalidInputError
from merge_service.methods import get_method_class
from merge_service.methods.linalg import truncated
from tests.methods.helpers import generator, low_rank, make_task, method, randn

F64 = torch.float64
TsvCompress = get_method_class("tsv_compress")


def task_parts(artifact: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    prefix = f"{t}::"
    return {key[len(prefix):]: value for key, value in artifact.items()
            if key.startswith(prefix)}


def test_is_an_artifact_method() -> None:
    assert TsvCompress is not None
    assert TsvCompress.output_formats == frozenset({"compressed"})
    assert TsvCompress.produces_delta is False


@pytest.mark.parametrize(("rank_fraction", "expected_k"), [(None, 3), (0.5, 5), (0.25, 2),
                                                           (1.0, 10)])
def test_reconstruct_is_the_rank_k_truncation(rank_fraction: float | None,
                                              expected_k: int) -> None:
    gen = generator(0)
    taus = [randn(gen, 12, 10) for _ in range(3)]  # r = 10, T = 3
    task = make_task(taus, weights=[1.0, 2.0, -0.5])  # weights play no part
    result = method("tsv_compress", rank_fraction=rank_fraction).merge(task)
    assert result.delta is None
    assert task.diagnostics["kept_rank"] == [expected_k] * 3
    for t, tau in enumerate(taus):
        parts = task_parts(result.artifact, t)
        assert sorted(parts) == ["S", "U", "V"]
        assert parts["U"].shape == (12, expected_k) and parts["V"].shape == (10, expected_k)
        assert all(p.is_contiguous() and p.dtype == F64 for p in parts.values())
        torch.testing.assert_close(TsvCompress.reconstruct(parts), truncated(tau, expected_k),
                                   rtol=1e-12, atol=1e-12)
    assert task.diagnostics["stored_numel"] == 3 * expected_k * (12 + 1 + 10)
    assert task.diagnostics["dense_numel"] == 3 * 120


def test_full_rank_fraction_recovers_the_task_vector() -> None:
    gen = generator(1)
    taus = [randn(gen, 7, 9) for _ in range(2)]
    result = method("tsv_compress", rank_fraction=1.0).merge(make_task(taus))
    for t, tau in enumerate(taus):
        torch.testing.assert_close(TsvCompress.reconstruct(task_parts(result.artifact, t)), tau,
                                   rtol=1e-12, atol=1e-12)


def test_k_is_capped_at_the_numerical_rank() -> None:
    gen = generator(2)
    taus = [low_rank(gen, 10, 10, 2), randn(gen, 10, 10)]  # r // T = 5
    task = make_task(taus)
    result = method("tsv_compress").merge(task)
    assert task.diagnostics["kept_rank"] == [2, 5]
    torch.testing.assert_close(TsvCompress.reconstruct(task_parts(result.artifact, 0)), taus[0],
                               rtol=1e-12, atol=1e-12)


def test_zero_tasks_store_nothing() -> None:
    gen = generator(3)
    tau = randn(gen, 6, 4)
    task = make_task([torch.zeros_like(tau), tau])
    artifact = method("tsv_compress").merge(task).artifact
    assert sorted(artifact) == ["1::S", "1::U", "1::V"]
    assert task.diagnostics["kept_rank"] == [0, 2]

    bias = randn(gen, 5)
    task = make_task([bias, torch.zeros_like(bias), 2 * bias], name="layers.0.bias")
    artifact = method("tsv_compress").merge(task).artifact
    assert sorted(artifact) == ["0::delta", "2::delta"]
    assert task.diagnostics["stored_numel"] == 10


@pytest.mark.parametrize(("shape", "name"), [((5,), "layers.0.bias"), ((2, 3, 4), "conv.weight"),
                                             ((8, 6), "model.embed_tokens.weight")])
def test_non_matrix_deltas_are_stored_whole(shape: tuple[int, ...], name: str) -> None:
    gen = generator(4)
    taus = [randn(gen, *shape) for _ in range(2)]
    result = method("tsv_compress").merge(make_task(taus, weights=[3.0, 3.0], name=name))
    for t, tau in enumerate(taus):
        parts = task_parts(result.artifact, t)
        assert list(parts) == ["delta"]
        assert torch.equal(TsvCompress.reconstruct(parts), tau)


@pytest.mark.parametrize(("parts", "message"), [
    ({"U": (2, 1), "S": (1,)}, r"missing part\(s\) V \(found S, U; expected U, S, V or delta\)"),
    ({"U": (2, 1), "S": (1,), "V": (3, 1), "W": (1,)}, r"unexpected part\(s\) W \(found S, U"),
    ({"delta": (2, 3), "S": (1,)}, r"unexpected part\(s\) S \(found S, delta"),
    ({"U": (2, 1), "S": (2,), "V": (3, 1)},
     r"do not fit together: U \[2, 1\], S \[2\], V \[3, 1\] \(expected U \[m, k\]"),
    ({"U": (2, 1), "S": (1,), "V": (3,)}, "do not fit together"),
    ({"U": (2, 1), "S": (1, 1), "V": (3, 1)}, "do not fit together"),
])
def test_reconstruct_refuses_parts_that_are_not_a_factorization(
        parts: dict[str, tuple[int, ...]], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        TsvCompress.reconstruct({name: torch.zeros(shape) for name, shape in parts.items()})
