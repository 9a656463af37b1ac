"""`adarank` (METHODS.md section 12): parameters, the factored task vectors, the
straight-through masks, and calibration data. Float64 throughout. The model-level tests (engine,
MiniLM, tiny Llama, preflight) are in tests/test_adarank_models.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from merge_service.adarank.calibration import calibration_problems, read_calibration
from merge_service.adarank.factors import (
    dense_terms,
    hard_mask,
    initial_logits,
    low_rank_terms,
    matrix_terms,
    straight_through_mask,
)
from merge_service.methods import build_method
from merge_service.spec import CalibrationSource
from tests.methods.helpers import generator, low_rank, make_task, merge, method, randn

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# parameters


def test_defaults_depend_on_base() -> None:
    ta = method("adarank").params
    assert (ta.base, ta.prior, ta.initial_rank_ratio) == ("task_arithmetic", 0.3, 1.0)
    assert (ta.steps, ta.lr, ta.batch_size, ta.temperature) == (500, 1e-3, 16, 10.0)
    cart = method("adarank", base="cart").params
    assert (cart.prior, cart.initial_rank_ratio) == (2.0, 0.16)
    explicit = method("adarank", base="cart", prior=0.5, initial_rank_ratio=1.0).params
    assert (explicit.prior, explicit.initial_rank_ratio) == (0.5, 1.0)


@pytest.mark.parametrize("params", [{"base": "ties"}, {"steps": -1}, {"lr": 0},
                                    {"batch_size": 0}, {"temperature": 0},
                                    {"initial_rank_ratio": 1.5}, {"rank": 3}])
def test_bad_params_are_problems(params: dict) -> None:
    built, problems = build_method("adarank", params)
    assert built is None and problems
    assert all(p.field and p.field.startswith("method.params") for p in problems)


# ---------------------------------------------------------------------------------------------
# factored task vectors


def ones_and_lambda(terms, lam: float, num_tasks: int):
    return (torch.full((num_tasks,), lam, dtype=F64),
            torch.ones(terms.total_rank, dtype=F64) if terms.is_matrix else None)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), m=st.integers(2, 9), n=st.integers(2, 9),
       num_tasks=st.integers(2, 4))
def test_all_ones_masks_and_lambda_one_is_task_arithmetic(seed: int, m: int, n: int,
                                                          num_tasks: int) -> None:
    gen = generator(seed)
    base = randn(gen, m, n)
    weights = [float(w) for w in torch.rand(num_tasks, generator=gen, dtype=F64) * 2 + 0.1]
    taus = [randn(gen, m, n) for _ in range(num_tasks)]
    xs = [w * t for w, t in zip(weights, taus, strict=True)]  # X_t = w_t τ_t
    terms = matrix_terms("w", base, xs)
    expected = base + merge("task_arithmetic", make_task(taus, weights), alpha=1.0)
    torch.testing.assert_close(terms.merged(*ones_and_lambda(terms, 1.0, num_tasks)), expected,
                               rtol=1e-10, atol=1e-10)
    vector = dense_terms("b", base[0], [x[0] for x in xs])
    torch.testing.assert_close(vector.merged(*ones_and_lambda(vector, 1.0, num_tasks)),
                               expected[0], rtol=1e-12, atol=1e-12)


def test_factors_are_kept_over_the_numerical_rank() -> None:
    gen = generator(1)
    xs = [low_rank(gen, 12, 10, 3), None, low_rank(gen, 12, 10, 5)]
    terms = matrix_terms("w", randn(gen, 12, 10), xs)
    assert terms.ranks == [3, 0, 5]
    for x, s in zip(xs, terms.slices(), strict=True):
        if x is not None:
            torch.testing.assert_close((terms.u[:, s] * terms.sigma[s]) @ terms.v[:, s].mT, x,
                                       rtol=1e-10, atol=1e-10)
    assert torch.equal(terms.task_of, torch.tensor([0] * 3 + [2] * 5))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), ranks=st.lists(st.integers(1, 4), min_size=2, max_size=4),
       cart=st.booleans(), missing=st.booleans())
@example(seed=826, ranks=[1, 4, 2, 2], cart=True, missing=False)  # one σ below the cut
def test_low_rank_factors_equal_the_dense_task_vectors(seed: int, ranks: list[int], cart: bool,
                                                       missing: bool) -> None:
    """From (A_t, B_t): `U_t diag(σ_t) V_tᵀ = Σ_s c_ts B_s A_s` over its numerical rank (the
    SVD METHODS.md section 12 takes, as the dense path does) with no m × n product formed,
    for task arithmetic (c = I) and the cart base (c = I − w 1ᵀ / Σw); a task without the
    module is a zero task."""
    gen = generator(seed)
    m, n = 11, 9
    factors = [(randn(gen, r, n), randn(gen, m, r)) for r in ranks]
    if missing:
        factors[-1] = None  # type: ignore[call-overload]
    num = len(factors)
    weights = torch.rand(num, generator=gen, dtype=F64) + 0.5
    mixing = torch.eye(num, dtype=F64)
    if cart:
        mixing -= weights[:, None] / weights.sum()
    deltas = [torch.zeros(m, n, dtype=F64) if f is None else f[1] @ f[0] for f in factors]
    terms = low_rank_terms("w", torch.zeros(m, n, dtype=F64), factors, mixing)
    for t, s in enumerate(terms.slices()):
        expected = sum(mixing[t, k] * deltas[k] for k in range(num))
        got = (terms.u[:, s] * terms.sigma[s]) @ terms.v[:, s].mT
        # the same singular values as the dense SVD, over the same numerical rank
        dense = matrix_terms("d", torch.zeros(m, n, dtype=F64), [expected])
        assert terms.ranks[t] == dense.ranks[0]
        torch.testing.assert_close(terms.sigma[s], dense.sigma, rtol=1e-9, atol=1e-10)
        # the product: the dense one less what lies below the cut (random mixes of 9 rank-1
        # terms in 9 columns are sometimes that ill-conditioned: seed 826 drops 7e-6 of 3)
        truncated = (dense.u * dense.sigma) @ dense.v.mT
        torch.testing.assert_close(got, truncated, rtol=1e-9, atol=1e-10)
        dropped = torch.linalg.svdvals(expected)[terms.ranks[t]:]
        assert float((got - expected).norm()) <= float(dropped.norm()) + 1e-9


@pytest.mark.parametrize(("ratio", "rank", "kept"), [(1.0, 7, 7), (0.16, 25, 4), (0.16, 6, 0),
                                                      (0.5, 9, 4), (0.0, 5, 0), (0.29, 100, 29)])
def test_initial_logits(ratio: float, rank: int, kept: int) -> None:
    logits = initial_logits([rank, 3], ratio, dtype=F64, device=torch.device("cpu"))
    first = logits[:rank]
    assert int((first == 0.1).sum()) == kept and int((first == -0.1).sum()) == rank - kept
    assert torch.equal(first[:kept], torch.full((kept,), 0.1, dtype=F64))
    # +0.1 / temperature 10 -> p = sigmoid(0.01) > 0.5: kept; −0.1 -> dropped
    assert int(hard_mask(first, 10.0).sum()) == kept


# ---------------------------------------------------------------------------------------------
# straight-through estimator


def test_forward_uses_the_hard_mask() -> None:
    logits = torch.tensor([0.3, -0.2, 0.001, -4.0, 0.0], dtype=F64, requires_grad=True)
    mask = straight_through_mask(logits, 10.0)
    assert torch.equal(mask.detach(), torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=F64))


def test_gradient_flows_through_the_sigmoid() -> None:
    """d loss / d m is the chain rule through the soft mask p = sigmoid(m / T) evaluated at the
    hard-masked weights: checked against central differences of the soft part alone."""
    gen = generator(7)
    temperature = 3.0
    m, n = 6, 5
    base = randn(gen, m, n)
    xs = [low_rank(gen, m, n, 3), low_rank(gen, m, n, 2)]
    terms = matrix_terms("w", base, xs)
    lam = torch.tensor([0.7, 1.3], dtype=F64)
    probe = randn(gen, 4, m)
    logits0 = randn(gen, terms.total_rank) * 2

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        return torch.tanh(probe @ theta).pow(2).sum()

    logits = logits0.clone().requires_grad_()
    loss_of(terms.merged(lam, straight_through_mask(logits, temperature))).backward()
    hard = hard_mask(logits0, temperature).to(F64)
    p0 = torch.sigmoid(logits0 / temperature)

    def soft_part(x: torch.Tensor) -> torch.Tensor:  # b + (p(x) − p(x0)): the value is b at x0
        return loss_of(terms.merged(lam, hard + torch.sigmoid(x / temperature) - p0))

    eps = 1e-6
    numeric = torch.zeros_like(logits0)
    for i in range(logits0.numel()):
        step = torch.zeros_like(logits0)
        step[i] = eps
        numeric[i] = (soft_part(logits0 + step) - soft_part(logits0 - step)) / (2 * eps)
    assert logits.grad is not None and float(logits.grad.abs().max()) > 1e-3
    torch.testing.assert_close(logits.grad, numeric, rtol=1e-6, atol=1e-9)
    # and the gradient is not zero where the hard mask is 0: dropped values can come back
    assert bool((logits.grad[hard == 0] != 0).all())


def test_gradient_of_lambda_is_the_hard_masked_direction() -> None:
    gen = generator(8)
    base = randn(gen, 5, 4)
    xs = [low_rank(gen, 5, 4, 2), low_rank(gen, 5, 4, 3)]
    terms = matrix_terms("w", base, xs)
    logits = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=F64)
    lam = torch.tensor([0.4, 0.9], dtype=F64, requires_grad=True)
    out = terms.merged(lam, straight_through_mask(logits, 10.0))
    out.sum().backward()
    keep = hard_mask(logits, 10.0).to(F64)
    for t, s in enumerate(terms.slices()):
        kept = (terms.u[:, s] * (keep[s] * terms.sigma[s])) @ terms.v[:, s].mT
        torch.testing.assert_close(lam.grad[t], kept.sum(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# calibration data


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def test_reads_the_field_up_to_max_samples(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"t{i}", "label": i} for i in range(10)]
                       + ["", "  "])
    found, problems = read_calibration("a", CalibrationSource(path=str(path), max_samples=4))
    assert problems == [] and found is not None
    assert found.texts == ["t0", "t1", "t2", "t3"]
    other = write_jsonl(tmp_path / "b.jsonl", [{"sentence": "x"}, {"sentence": "y"}])
    found, problems = read_calibration("b", CalibrationSource(path=str(other), field="sentence"))
    assert found is not None and found.texts == ["x", "y"]


def test_every_calibration_problem_is_reported(tmp_path: Path) -> None:
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"sentence": "x"},
                                                        "not json", {"text": 3}])
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    calibration = {
        "a": CalibrationSource(path=str(tmp_path / "missing.jsonl")),
        "b": CalibrationSource(path=str(empty)),
        "c": CalibrationSource(path=str(no_field)),
        "typo": CalibrationSource(path=str(good)),
    }
    sets, problems = calibration_problems(calibration, ["a", "b", "c", "d"])
    text = "\n".join(str(p) for p in problems)
    assert sets == {}
    assert "calibration.typo" in text and "not a task of this merge" in text
    assert "task 'd' has no calibration data" in text
    assert "missing.jsonl does not exist" in text
    assert "empty.jsonl is empty" in text
    assert "line 2 has no field 'text'" in text
    assert "line 3 is not valid JSON" in text
    assert "line 4 field 'text' is not a non-empty string" in text
    assert len(problems) == 7


def test_no_calibration_is_a_problem() -> None:
    _, problems = calibration_problems(None, ["a", "b"])
    assert len(problems) == 1 and problems[0].field == "calibration"
    assert "adarank needs calibration data" in problems[0].message
