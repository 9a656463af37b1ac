"""`drm` (METHODS.md section 11): Decom-Renorm-Merge."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_service.methods import build_method
from merge_service.methods.drm import kept_count, prune_smallest, shared_basis_merge
from tests.methods.helpers import generator, low_rank, make_task, merge, orthonormal, randn

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# the definition, written out plainly (stacked tensors, torch.kthvalue, the SVD's own V and U
# blocks), to check the method against


def _prune_and_merge(n: torch.Tensor, s: torch.Tensor, weights: list[float],
                     drop_rate: float) -> torch.Tensor:
    """`n`: stacked N (T × R × d), `s`: T × R. Returns Ȳ (R × d)."""
    flat = n.reshape(-1)
    k = flat.numel() - round(flat.numel() * (1 - Fraction(repr(drop_rate))))
    if k >= 1:
        kth = flat.abs().kthvalue(k).values
        n = n.masked_fill(n.abs() < kth, 0)
    y = s[..., None] * n
    total = y.sum(0)
    gamma = total.sign()
    gamma[gamma == 0] = gamma.sum().sign()
    y = y.masked_fill(y.sign() != gamma, 0)
    z = y * torch.tensor(weights, dtype=y.dtype)[:, None, None]
    return z.sum(0) / torch.count_nonzero(z, dim=0).clamp_min(1)


def reference_horizontal(taus: list[torch.Tensor], weights: list[float],
                         drop_rate: float) -> torch.Tensor:
    width = taus[0].shape[1]
    u, sigma, vh = torch.linalg.svd(torch.cat(taus, dim=1), full_matrices=False)
    r = int((sigma > 0.01 * sigma[0]).sum())
    blocks = torch.stack([vh[:r, t * width:(t + 1) * width] for t in range(len(taus))])
    nu = blocks.norm(dim=2)  # T × R
    n = blocks / nu[..., None]
    return u[:, :r] @ _prune_and_merge(n, sigma[:r] * nu, weights, drop_rate)


def reference_vertical(taus: list[torch.Tensor], weights: list[float],
                       drop_rate: float) -> torch.Tensor:
    m, _ = taus[0].shape
    u, sigma, vh = torch.linalg.svd(torch.cat(taus, dim=0), full_matrices=False)
    r = int((sigma > 0.01 * sigma[0]).sum())
    blocks = torch.stack([u[t * m:(t + 1) * m, :r] for t in range(len(taus))])  # T × m × R
    nu = blocks.norm(dim=1)  # column norms, T × R
    n = blocks / nu[:, None, :]
    # the same pruning and election, on the U blocks (entries are entries, in any layout)
    merged = _prune_and_merge(n.mT, sigma[:r] * nu, weights, drop_rate).mT  # Ū, m × R
    return merged @ vh[:r]


def random_tasks(seed: int, num_tasks: int, m: int, n: int) -> list[torch.Tensor]:
    gen = generator(seed)
    return [randn(gen, m, n) for _ in range(num_tasks)]


# ---------------------------------------------------------------------------------------------
# the matrix rule


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(2, 4), m=st.integers(1, 14),
       n=st.integers(1, 14), drop_rate=st.sampled_from([0.1, 0.5, 0.8, 0.95]),
       direction=st.sampled_from(["horizontal", "vertical"]),
       weights=st.lists(st.floats(-2, 2).filter(lambda w: abs(w) > 0.05), min_size=4,
                        max_size=4))
def test_matches_the_definition_written_out(seed: int, num_tasks: int, m: int, n: int,
                                            drop_rate: float, direction: str,
                                            weights: list[float]) -> None:
    taus = random_tasks(seed, num_tasks, m, n)
    weights = weights[:num_tasks]
    alpha = 0.7
    task = make_task(taus, weights)
    delta = merge("drm", task, drop_rate=drop_rate, direction=direction, alpha=alpha)
    reference = reference_horizontal if direction == "horizontal" else reference_vertical
    torch.testing.assert_close(delta, alpha * reference(taus, weights, drop_rate),
                               rtol=1e-9, atol=1e-9)
    assert task.diagnostics["direction"] == direction
    assert torch.isfinite(delta).all()


@pytest.mark.parametrize("direction", ["horizontal", "vertical", "auto"])
def test_drop_rate_zero_is_the_disjoint_mean_of_the_unweighted_task_vectors(
        direction: str) -> None:
    gen = generator(1)
    # sparse task vectors, so that the number of non-zero τ_t differs from entry to entry
    taus = [randn(gen, 9, 7) * (torch.rand(9, 7, generator=gen) < 0.5) for _ in range(3)]
    count = sum((t != 0).to(F64) for t in taus)
    expected = sum(taus) / count.clamp_min(1)
    task = make_task(taus, weights=[2.0, -0.5, 3.0])  # no coefficients
    delta = merge("drm", task, drop_rate=0.0, direction=direction, alpha=0.3)
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-15)
    # no sign election: entries of both signs are averaged together
    mixed = (sum((t > 0).to(F64) for t in taus) > 0) & (sum((t < 0).to(F64) for t in taus) > 0)
    assert bool(mixed.any())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(2, 5),
       direction=st.sampled_from(["horizontal", "vertical", "auto"]),
       drop_rate=st.sampled_from([0.0, 0.3, 0.8]), data=st.data())
def test_invariant_under_reordering_the_models(seed: int, num_tasks: int, direction: str,
                                               drop_rate: float, data: st.DataObject) -> None:
    gen = generator(seed)
    taus = [randn(gen, 10, 8) for _ in range(num_tasks)]
    if direction == "auto" and seed % 2:  # a shared column space: auto picks horizontal
        shared = low_rank(gen, 10, 3, 3)
        taus = [shared @ randn(gen, 3, 8) for _ in range(num_tasks)]
    weights = [1.0 + 0.5 * t for t in range(num_tasks)]
    order = data.draw(st.permutations(range(num_tasks)))
    params = {"direction": direction, "drop_rate": drop_rate}
    a = merge("drm", make_task(taus, weights), **params)
    b = merge("drm", make_task([taus[i] for i in order], [weights[i] for i in order]), **params)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(2, 4), m=st.integers(1, 12),
       n=st.integers(1, 12), drop_rate=st.sampled_from([0.2, 0.8]))
def test_vertical_is_horizontal_on_the_transposes(seed: int, num_tasks: int, m: int, n: int,
                                                  drop_rate: float) -> None:
    taus = random_tasks(seed, num_tasks, m, n)
    weights = [1.5, -0.5, 1.0, 0.25][:num_tasks]
    vertical = merge("drm", make_task(taus, weights), direction="vertical", drop_rate=drop_rate)
    horizontal = merge("drm", make_task([t.mT for t in taus], weights), direction="horizontal",
                       drop_rate=drop_rate)
    assert vertical.shape == (m, n)
    torch.testing.assert_close(vertical, horizontal.mT, rtol=1e-9, atol=1e-9)


def drop_rate_with_the_same_threshold(total: int, fewer: int, drop_rate: float) -> float:
    """A rate that prunes `fewer` entries down to the count `total` entries are pruned to at
    `drop_rate`: round(fewer · (1 − p')) = round(total · (1 − drop_rate))."""
    kept = kept_count(total, drop_rate)
    assert kept < fewer
    rate = float(1 - Fraction(kept, fewer))
    assert kept_count(fewer, rate) == kept
    return rate


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
@pytest.mark.parametrize("zero_at", [0, 2])
def test_a_zero_task_drops_out_except_from_the_pruning_count(direction: str,
                                                              zero_at: int) -> None:
    """What section 11 implies for a task whose delta is 0 in this tensor.

    Its block of the decomposition is 0, so its rows of N are 0 (the zero-row rule: finite),
    its Y_t and Z_t are 0: it takes no part in the sign election nor in the disjoint mean's
    count. But its R·d zeros are entries of the stacked N, which pruning counts: they are the
    smallest |x|, so at the same drop_rate more of the other entries are kept. The result is
    exactly the merge without the task at the rate that keeps the same k-th smallest |x|.
    """
    m, n = 12, 9
    taus = random_tasks(3, 3, m, n)
    weights = [0.5, 2.0, 1.5]
    others = [t for i, t in enumerate(taus) if i != zero_at]
    other_weights = [w for i, w in enumerate(weights) if i != zero_at]
    with_zero = list(taus)
    with_zero[zero_at] = torch.zeros(m, n, dtype=F64)
    task = make_task(with_zero, weights)
    delta = merge("drm", task, direction=direction, drop_rate=0.8)
    assert torch.isfinite(delta).all()

    rank = task.diagnostics["rank"]
    width = n if direction == "horizontal" else m
    same_threshold = drop_rate_with_the_same_threshold(3 * rank * width, 2 * rank * width, 0.8)
    without = make_task(others, other_weights)
    expected = merge("drm", without, direction=direction, drop_rate=same_threshold)
    assert without.diagnostics["rank"] == rank
    torch.testing.assert_close(delta, expected, rtol=1e-10, atol=1e-12)
    # the zeros count: at the same drop_rate the merge without the task prunes more
    plain = make_task(others, other_weights)
    assert not torch.allclose(merge("drm", plain, direction=direction, drop_rate=0.8), delta)


@pytest.mark.parametrize(("shape", "name", "drop_rate"), [
    ((9, 7), "layers.0.mlp.weight", 0.0),  # drop_rate 0: the disjoint mean
    ((20,), "layers.0.bias", 0.8),  # non-matrix rule
    ((9, 7), "model.embed_tokens.weight", 0.8),
])
def test_a_zero_task_is_exactly_absent_from_the_disjoint_mean_rules(
        shape: tuple[int, ...], name: str, drop_rate: float) -> None:
    gen = generator(4)
    taus = [randn(gen, *shape) for _ in range(2)]
    weights = [1.0, -0.75]
    with_zero = merge("drm", make_task([taus[0], torch.zeros(shape, dtype=F64), taus[1]],
                                       [weights[0], 3.0, weights[1]], name=name),
                      drop_rate=drop_rate)
    without = merge("drm", make_task(taus, weights, name=name), drop_rate=drop_rate)
    assert torch.equal(with_zero, without)


def test_every_task_zero_gives_zero() -> None:
    zeros = [torch.zeros(5, 4, dtype=F64) for _ in range(3)]
    for direction in ("horizontal", "vertical", "auto"):
        task = make_task(zeros)
        assert torch.equal(merge("drm", task, direction=direction), torch.zeros(5, 4, dtype=F64))
        assert task.diagnostics["rank"] == 0


def test_opposite_tasks_cancel_under_the_zero_sign_rule() -> None:
    """τ and −τ: every sum is 0, so is the sum of the elected signs: γ = 0 keeps nothing
    (the +1 rule of ties would keep the positive entries of both)."""
    tau = randn(generator(5), 8, 6)
    for direction in ("horizontal", "vertical"):
        delta = merge("drm", make_task([tau, -tau]), direction=direction, drop_rate=0.5)
        assert torch.equal(delta, torch.zeros_like(tau))


def test_hand_checked_renorm_election_and_disjoint_mean() -> None:
    """`shared_basis_merge` on coordinates (T × R × d) small enough to follow by hand."""
    # one component (R = 1), d = 4; drop_rate 0.05: k = 8 − round(7.6) = 0, nothing pruned
    coords = torch.tensor([[[1.0, 2.0, -3.0, 5.0]], [[-1.0, 1.0, -1.0, 4.0]]], dtype=F64)
    # Σ = [0, 3, -4, 9]: elected [?, +, -, +], their sum +1 fills the zero: γ = [+, +, -, +]
    # Z_1 = [1, 2, -3, 5], Z_2 = 2·[0, 1, -1, 4] = [0, 2, -2, 8]
    diagnostics: dict = {}
    merged = shared_basis_merge(coords.clone(), [1.0, 2.0], 0.05, diagnostics)
    assert merged.tolist() == [[1.0, 2.0, -2.5, 6.5]]
    assert diagnostics["pruned_fraction"] == 0.0
    assert diagnostics["sign_conflict"] == pytest.approx(1 / 8)
    # the elected signs sum to −1: the zero sum takes −
    coords = torch.tensor([[[1.0, -2.0, -3.0, -5.0]], [[-1.0, -1.0, -1.0, -4.0]]], dtype=F64)
    merged = shared_basis_merge(coords, [1.0, 2.0], 0.05, {})
    assert merged.tolist() == [[-2.0, -2.0, -2.5, -6.5]]


def test_renormalisation_prunes_per_component_not_by_raw_magnitude() -> None:
    """|N| = |x| / ‖row‖: a large-norm row and a small-norm row with the same shape of entries
    are pruned alike (raw magnitude pruning would empty the small row)."""
    row = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64)
    coords = torch.stack([torch.stack([64 * row, row])])  # T = 1, R = 2, d = 4
    # N_all = 8, drop_rate 0.5: k = 4, the 4th smallest |N| is the 2/‖row‖ of either row,
    # and the two entries 1/‖row‖ below it are pruned: one in each row
    merged = shared_basis_merge(coords, [1.0], 0.5, {})
    expected = torch.tensor([[256.0, 192.0, 128.0, 0.0], [4.0, 3.0, 2.0, 0.0]], dtype=F64)
    assert torch.equal(merged, expected)


# ---------------------------------------------------------------------------------------------
# pruning


@pytest.mark.parametrize(("numel", "drop_rate", "kept"), [
    (10, 0.8, 2),
    (5, 0.5, 2),  # 2.5: half to even
    (7, 0.5, 4),  # 3.5: half to even
    (35, 0.7, 10),  # 10.5 exactly; the float product 35 · (1 − 0.7) is 10.500000000000002
    (100, 0.29, 71),
    (3, 1.0, 0),
])
def test_kept_count_rounds_half_to_even_on_the_written_decimal(numel: int, drop_rate: float,
                                                                kept: int) -> None:
    assert kept_count(numel, drop_rate) == kept


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), numel=st.integers(1, 400),
       drop_rate=st.floats(0.0, 1.0, allow_subnormal=False))
def test_pruning_keeps_the_expected_count(seed: int, numel: int, drop_rate: float) -> None:
    """Distinct magnitudes: the entries below the k-th smallest go, that is k − 1 of them, and
    they are the smallest; the same threshold as torch.kthvalue."""
    magnitudes = torch.rand(numel, generator=generator(seed), dtype=F64) + 1e-3
    pruned, k = prune_smallest(magnitudes, drop_rate)
    assert k == numel - round(numel * (1 - Fraction(repr(drop_rate))))
    if k < 1:
        assert pruned is None
        return
    assert pruned is not None
    assert int(pruned.sum()) == k - 1
    kth = magnitudes.kthvalue(k).values
    assert torch.equal(pruned, magnitudes < kth)


def test_ties_at_the_threshold_are_all_kept() -> None:
    magnitudes = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.1, 2.0], dtype=F64)
    pruned, k = prune_smallest(magnitudes, 0.5)  # k = 3: the 3rd smallest is 0.5
    assert k == 3
    assert pruned is not None and pruned.tolist() == [False] * 4 + [True, False]


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
@pytest.mark.parametrize("drop_rate", [0.3, 0.8, 0.95])
def test_the_method_prunes_k_minus_one_of_the_stacked_entries(direction: str,
                                                               drop_rate: float) -> None:
    taus = random_tasks(6, 3, 10, 7)
    task = make_task(taus)
    merge("drm", task, direction=direction, drop_rate=drop_rate)
    rank = task.diagnostics["rank"]
    stacked = 3 * rank * (7 if direction == "horizontal" else 10)
    k = stacked - kept_count(stacked, drop_rate)
    assert task.diagnostics["pruned_k"] == k
    assert task.diagnostics["pruned_fraction"] == pytest.approx((k - 1) / stacked)


def test_components_below_one_percent_of_the_top_are_cut() -> None:
    """R = #{σ_i > 0.01 σ_1}: a shared basis of 3 strong directions and 1 at 0.5 %."""
    gen = generator(7)
    u, v = orthonormal(gen, 10, 4), orthonormal(gen, 8, 4)
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.015], dtype=F64)
    taus = [(u * (sigma * (1 + 0.1 * t))) @ v.mT for t in range(2)]
    task = make_task(taus)
    merge("drm", task)
    assert task.diagnostics["rank"] == 3


# ---------------------------------------------------------------------------------------------
# direction


def test_auto_follows_the_rank_rule() -> None:
    gen = generator(8)
    shared_columns = low_rank(gen, 12, 2, 2)
    shared_rows = low_rank(gen, 2, 10, 2)
    cases = {
        # [τ_1 … τ_T] has rank 2, [τ_1; …; τ_T] rank 6: horizontal
        "horizontal": [shared_columns @ randn(gen, 2, 10) for _ in range(3)],
        # the other way round: vertical
        "vertical": [randn(gen, 12, 2) @ shared_rows for _ in range(3)],
        # equal ranks (two orthogonal matrices: all σ = √2 either way): not "<", so vertical
        "tie": [orthonormal(gen, 10, 10) for _ in range(2)],
    }
    for case, taus in cases.items():
        task = make_task(taus, [1.0, 0.5, 2.0][:len(taus)])
        delta = merge("drm", task, direction="auto")
        ranks = task.diagnostics["stacked_ranks"]
        assert ranks["horizontal"] == int(torch.linalg.matrix_rank(torch.cat(taus, 1), rtol=0.1))
        assert ranks["vertical"] == int(torch.linalg.matrix_rank(torch.cat(taus, 0), rtol=0.1))
        chosen = "horizontal" if ranks["horizontal"] < ranks["vertical"] else "vertical"
        assert task.diagnostics["direction"] == chosen
        assert chosen == (case if case != "tie" else "vertical")
        explicit = merge("drm", make_task(taus, [1.0, 0.5, 2.0][:len(taus)]), direction=chosen)
        assert torch.equal(delta, explicit)


def test_auto_ranks_use_rtol_one_tenth() -> None:
    """A second direction at 5 % of the first does not count for the choice (rtol 0.1)."""
    gen = generator(9)
    u, v = orthonormal(gen, 12, 2), orthonormal(gen, 10, 4)
    # the same two columns for every task: horizontal stack rank 2 at rtol 1e-5, but with
    # σ_2 = 0.05 σ_1 it has rank 1 at rtol 0.1; the vertical stack has rank 2 at rtol 0.1
    taus = [(u * torch.tensor([1.0, 0.05], dtype=F64)) @ v[:, [t, t + 2]].mT
            for t in range(2)]
    task = make_task(taus)
    merge("drm", task, direction="auto")
    assert task.diagnostics["stacked_ranks"] == {"horizontal": 1, "vertical": 2}
    assert task.diagnostics["direction"] == "horizontal"


# ---------------------------------------------------------------------------------------------
# coefficients, alpha, dtypes


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_coefficients_scale_after_the_election(direction: str) -> None:
    """Uniform weights w scale the result by w (the election sees the unweighted Y_t, so
    even a negative w only flips the sign); alpha scales it too."""
    taus = random_tasks(10, 3, 9, 8)
    one = merge("drm", make_task(taus), direction=direction)
    for w in (2.0, -0.5):
        scaled = merge("drm", make_task(taus, [w] * 3), direction=direction, alpha=1.5)
        torch.testing.assert_close(scaled, 1.5 * w * one, rtol=1e-12, atol=1e-14)


def test_a_zero_coefficient_removes_the_task_from_the_mean_only() -> None:
    """c_t = 0 zeroes Z_t (not counted), but τ_t still shapes the basis, pruning, election."""
    taus = random_tasks(11, 3, 9, 8)
    task = make_task(taus, [1.0, 0.0, 1.0])
    delta = merge("drm", task)
    torch.testing.assert_close(delta, reference_horizontal(taus, [1.0, 0.0, 1.0], 0.8),
                               rtol=1e-9, atol=1e-9)
    without = merge("drm", make_task([taus[0], taus[2]]))
    assert not torch.allclose(delta, without)


def test_float32_agrees_with_float64() -> None:
    taus = random_tasks(12, 3, 24, 16)
    exact = merge("drm", make_task(taus))
    single = merge("drm", make_task([t.float() for t in taus]))
    assert single.dtype == torch.float32
    # a handful of entries near the pruning threshold may fall the other way in float32
    close = (single.double() - exact).abs() <= 1e-4 * exact.abs().max()
    assert close.double().mean() > 0.98


# ---------------------------------------------------------------------------------------------
# non-matrix tensors


def test_hand_checked_non_matrix_rule() -> None:
    tau1 = torch.tensor([1.0, 2.0, -3.0, 4.0, 0.0], dtype=F64)
    tau2 = torch.tensor([-1.0, 1.0, 1.0, -6.0, -2.0], dtype=F64)
    # Σ = [0, 3, -2, -2, -2]: elected [?, +, -, -, -] sum to −2, so the zero sum takes −
    # kept: τ1 [0, 2, -3, 0, 0], τ2 [-1, 1, 0, -6, -2]; Z = c·kept with c = [1, 2]
    task = make_task([tau1, tau2], [1.0, 2.0], name="layers.0.bias")
    delta = merge("drm", task, alpha=0.5)
    assert delta.tolist() == [0.5 * -2.0, 0.5 * 2.0, 0.5 * -3.0, 0.5 * -12.0, 0.5 * -4.0]
    assert task.diagnostics["sign_conflict"] == pytest.approx(3 / 9)
    # τ and −τ: every sum and the sum of the elected signs are 0; γ = 0 keeps nothing
    delta = merge("drm", make_task([tau1, -tau1], name="layers.0.bias"))
    assert torch.equal(delta, torch.zeros_like(tau1))


@pytest.mark.parametrize(("shape", "name", "params"), [
    ((17,), "layers.0.bias", {}),
    ((2, 3, 4), "conv.weight", {}),
    ((8, 6), "embeddings.word_embeddings.weight", {}),
    ((8, 6), "layers.0.q_proj.weight", {"svd_exclude": ["q_proj"]}),
])
@pytest.mark.parametrize("drop_rate", [0.0, 0.8])
def test_non_matrix_rule(shape: tuple[int, ...], name: str, params: dict,
                         drop_rate: float) -> None:
    """Sign election with the zero rule on the τ_t, Z_t = c_t τ_t, disjoint mean, times alpha;
    drop_rate does not enter (its rate-0 rule is for matrices)."""
    gen = generator(13)
    taus = [randn(gen, *shape) for _ in range(3)]
    weights = [1.0, -0.5, 2.0]
    stacked = torch.stack(taus)
    gamma = stacked.sum(0).sign()
    gamma[gamma == 0] = gamma.sum().sign()
    kept = stacked.masked_fill(stacked.sign() != gamma, 0)
    z = kept * torch.tensor(weights, dtype=F64).view(-1, *[1] * len(shape))
    expected = 0.9 * z.sum(0) / torch.count_nonzero(z, dim=0).clamp_min(1)
    task = make_task(taus, weights, name=name)
    delta = merge("drm", task, alpha=0.9, drop_rate=drop_rate, **params)
    torch.testing.assert_close(delta, expected, rtol=1e-14, atol=1e-15)
    assert "direction" not in task.diagnostics


# ---------------------------------------------------------------------------------------------
# parameters


def test_defaults() -> None:
    method, problems = build_method("drm", {})
    assert method is not None and not problems
    assert method.params.model_dump() == {
        "drop_rate": 0.8, "direction": "horizontal", "alpha": 1.0,
        "svd_exclude": ["embed_tokens", "word_embeddings", "position_embeddings",
                        "token_type_embeddings", "wte", "wpe", "lm_head", "embed_out"]}


@pytest.mark.parametrize(("params", "field", "message"), [
    ({"drop_rate": -0.1}, "drop_rate", "greater than or equal to 0"),
    ({"drop_rate": 1.5}, "drop_rate", "less than or equal to 1"),
    ({"drop_rate": "most"}, "drop_rate", "valid number"),
    ({"direction": "diagonal"}, "direction", "'horizontal', 'vertical' or 'auto'"),
    ({"alpha": float("nan")}, "alpha", "finite number"),
    ({"density": 0.5}, "density", "unknown parameter"),
])
def test_invalid_params_are_problems(params: dict, field: str, message: str) -> None:
    method, problems = build_method("drm", params)
    assert method is None
    assert [p.field for p in problems] == [f"method.params.{field}"]
    assert message in problems[0].message and "(method drm)" in problems[0].message
