"""`rmm` (METHODS.md section 13): reversible bases, float64 properties on random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_service.errors import InvalidInputError
from merge_service.methods import build_method, catalog, get_method_class
from merge_service.spaces import core_space
from tests.methods.helpers import generator, make_task, method, randn

F64 = torch.float64
Rmm = get_method_class("rmm")
SHAPES = [(7,), (6, 5), (3, 4, 2), (1, 9), ()]


def run(taus: list[torch.Tensor], weights: list[float] | None = None, name: str = "layer.w",
        **params):
    """Merge copies of `taus`; return (delta, artifact, diagnostics)."""
    task = make_task(taus, weights=weights, name=name)
    result = method("rmm", **params).merge(task)
    return result.delta, result.artifact, task.diagnostics


def recovered(artifact: dict[str, torch.Tensor], t: int) -> torch.Tensor:
    assert Rmm is not None
    return Rmm.reconstruct({"mu": artifact["shared::mu"], "basis": artifact["shared::basis"],
                            "coefficients": artifact[f"{t}::coefficients"]})


def centered_eigenvalues(taus: list[torch.Tensor]) -> torch.Tensor:
    """λ of `G_ts = ⟨D_t, D_s⟩`, descending, from the stacked centered task vectors."""
    flat = torch.stack([t.reshape(-1) for t in taus])
    d = flat - flat.mean(dim=0)
    return torch.linalg.eigvalsh(d @ d.mT).flip(0)


def test_registered_with_its_artifact_layout() -> None:
    assert Rmm is not None
    assert Rmm.output_formats == frozenset({"reversible"})
    assert Rmm.spaces == frozenset({"full", "core"})
    assert Rmm.uses_weights is False and Rmm.produces_delta is True
    assert {Rmm.artifact_files[p] for p in ("mu", "basis", "u_b", "v_a")} == {"basis"}
    assert Rmm.artifact_files["coefficients"] == "coefficients"
    entry = next(e for e in catalog() if e["name"] == "rmm")
    assert {k: v["default"] for k, v in entry["params"].items()} == {"basis_size": 2,
                                                                     "alpha": 1.0}
    assert entry["output_formats"] == ["reversible"]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(2, 6), shape=st.sampled_from(SHAPES),
       basis_size=st.integers(1, 7))
def test_defining_identities(seed: int, num_tasks: int, shape: tuple[int, ...],
                             basis_size: int) -> None:
    """Φ orthonormal, c_tj = ⟨D_t, Φ_j⟩, Σ_t ‖τ_t − τ̂_t‖² = Σ_{j>k} λ_j, the diagnostics are
    those quantities, exact recovery at p ≥ T − 1."""
    gen = generator(seed)
    taus = [randn(gen, *shape) for _ in range(num_tasks)]
    delta, artifact, diag = run(taus, basis_size=basis_size)
    mu = torch.stack(taus).mean(dim=0)
    torch.testing.assert_close(delta, mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(artifact["shared::mu"], mu, rtol=1e-12, atol=1e-12)

    lam = centered_eigenvalues(taus).clamp_min(0)
    scale = float(lam[0]) + 1e-300
    assert torch.allclose(torch.tensor(diag["eigenvalues"], dtype=F64), lam, atol=1e-10 * scale)
    numel = mu.numel()
    # rank(D) ≤ min(T − 1, numel): λ beyond it are rounding, below the 1e-10 λ_1 cut
    kept = min(basis_size, num_tasks - 1, numel)
    assert diag["kept"] == kept
    basis = artifact["shared::basis"]
    assert basis.shape == (kept, *shape) and basis.dtype == F64
    flat_phi = basis.reshape(kept, -1)
    torch.testing.assert_close(flat_phi @ flat_phi.mT, torch.eye(kept, dtype=F64),
                               rtol=0, atol=1e-9)

    total_sq_error = 0.0
    for t, tau in enumerate(taus):
        c = artifact[f"{t}::coefficients"]
        assert c.shape == (kept,)
        torch.testing.assert_close(c, flat_phi @ (tau - mu).reshape(-1), rtol=1e-9, atol=1e-9)
        sq_error = float((tau - recovered(artifact, t)).square().sum())
        assert sq_error == pytest.approx(diag["task_sq_error"][t], rel=1e-6, abs=1e-12 * scale)
        assert diag["task_sq_norm"][t] == pytest.approx(float(tau.square().sum()), rel=1e-12)
        total_sq_error += sq_error
    dropped = float(lam[kept:].sum())
    assert total_sq_error == pytest.approx(dropped, rel=1e-8, abs=1e-10 * scale)
    assert diag["dropped_eigenvalue_sum"] == pytest.approx(dropped, rel=1e-8,
                                                           abs=1e-10 * scale)
    if basis_size >= num_tasks - 1:
        for t, tau in enumerate(taus):
            torch.testing.assert_close(recovered(artifact, t), tau, rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(3, 6), basis_size=st.integers(1, 4))
def test_recovery_is_the_best_rank_p_affine_fit(seed: int, num_tasks: int,
                                                basis_size: int) -> None:
    """τ̂_t = μ + the rank-p SVD truncation of the stacked D_t (Eckart–Young), computed
    independently of the Gram."""
    gen = generator(seed)
    taus = [randn(gen, 8, 5) for _ in range(num_tasks)]
    _, artifact, _ = run(taus, basis_size=basis_size)
    flat = torch.stack([t.reshape(-1) for t in taus])
    mu = flat.mean(dim=0)
    u, s, vh = torch.linalg.svd(flat - mu, full_matrices=False)
    p = min(basis_size, num_tasks - 1)
    best = mu + (u[:, :p] * s[:p]) @ vh[:p]
    for t in range(num_tasks):
        torch.testing.assert_close(recovered(artifact, t).reshape(-1), best[t],
                                   rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), m=st.integers(2, 30), n=st.integers(2, 30),
       ranks=st.lists(st.one_of(st.none(), st.integers(1, 5)), min_size=2, max_size=5)
       .filter(lambda rs: any(r is not None for r in rs)), basis_size=st.integers(1, 4))
def test_core_space_gives_the_full_space_result(seed: int, m: int, n: int,
                                                ranks: list[int | None],
                                                basis_size: int) -> None:
    """Section 13 on LoRA inputs: U_B, V_A have orthonormal columns, so the Gram, its
    eigenvalues, the coefficients and every recovered task are those of full space, and
    `U_B · core · V_Aᵀ` maps μ and Φ_j to the full-space μ and Φ_j (up to the sign rule,
    which both spaces apply to the same Q)."""
    gen = generator(seed)
    factors = [None if r is None else (randn(gen, r, n), randn(gen, m, r)) for r in ranks]
    full_taus = [torch.zeros(m, n, dtype=F64) if f is None else f[1] @ f[0] for f in factors]
    space = core_space(factors)
    _, core_art, core_diag = run(space.cores, basis_size=basis_size)
    _, full_art, full_diag = run(full_taus, basis_size=basis_size)
    scale = max(full_diag["eigenvalues"][0], 1e-300)
    assert core_diag["kept"] == full_diag["kept"]
    assert torch.allclose(torch.tensor(core_diag["eigenvalues"]),
                          torch.tensor(full_diag["eigenvalues"]), rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(space.to_full(core_art["shared::mu"]), full_art["shared::mu"],
                               rtol=1e-9, atol=1e-9)
    lam = full_diag["eigenvalues"]
    for j, (core_phi, full_phi) in enumerate(zip(core_art["shared::basis"],
                                                 full_art["shared::basis"], strict=True)):
        neighbours = [lam[i] for i in (j - 1, j + 1) if 0 <= i < len(lam)]
        if min(abs(lam[j] - x) for x in neighbours) > 1e-6 * scale:  # Φ_j is unique up to sign
            mapped = space.to_full(core_phi)
            sign = 1.0 if float((mapped * full_phi).sum()) >= 0 else -1.0
            torch.testing.assert_close(mapped, sign * full_phi, rtol=1e-7, atol=1e-7)
    for t, tau in enumerate(full_taus):
        torch.testing.assert_close(space.to_full(recovered(core_art, t)),
                                   recovered(full_art, t), rtol=1e-9, atol=1e-9)
        if basis_size >= len(ranks) - 1:
            torch.testing.assert_close(space.to_full(recovered(core_art, t)), tau,
                                       rtol=1e-9, atol=1e-9)


def test_alpha_scales_the_served_mean_and_weights_play_no_part() -> None:
    gen = generator(1)
    taus = [randn(gen, 6, 4) for _ in range(3)]
    plain_delta, plain, _ = run(taus)
    delta, artifact, _ = run(taus, weights=[2.0, -1.0, 0.0], alpha=0.25)
    torch.testing.assert_close(delta, 0.25 * plain_delta, rtol=1e-12, atol=1e-12)
    assert plain.keys() == artifact.keys()
    for key in plain:
        torch.testing.assert_close(artifact[key], plain[key], rtol=1e-12, atol=1e-12)


def test_directions_below_the_cut_are_not_kept() -> None:
    """Task vectors on one line (τ_t = a + s_t b): one direction, whatever basis_size; equal
    task vectors: none, and τ̂_t = μ = τ_t."""
    gen = generator(2)
    a, b = randn(gen, 5, 5), randn(gen, 5, 5)
    taus = [a + s * b for s in (-1.0, 0.5, 2.0, 3.0)]
    _, artifact, diag = run(taus, basis_size=3)
    assert diag["kept"] == 1 and artifact["shared::basis"].shape == (1, 5, 5)
    for t, tau in enumerate(taus):
        torch.testing.assert_close(recovered(artifact, t), tau, rtol=1e-10, atol=1e-10)

    _, artifact, diag = run([a, a.clone(), a.clone()], basis_size=2)
    assert diag["kept"] == 0 and diag["eigenvalues"] == pytest.approx([0.0] * 3, abs=1e-20)
    assert artifact["shared::basis"].shape == (0, 5, 5)
    assert artifact["0::coefficients"].shape == (0,)
    torch.testing.assert_close(recovered(artifact, 2), a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("relative", [5e-4, 1e-5])
def test_close_task_vectors_in_float32_are_recovered(relative: float) -> None:
    """Two float32 task vectors a relative `relative` apart: their one direction is well above
    what rounding leaves in the D_t, so it is kept and both tasks come back to float32
    accuracy (not collapsed onto μ, a relative error of `relative` / 2)."""
    gen = generator(5)
    a, b = randn(gen, 64, 48), randn(gen, 64, 48)
    taus = [a.float(), (a + relative * b).float()]
    _, artifact, diag = run(taus, basis_size=1)
    assert diag["kept"] == 1
    for t, tau in enumerate(taus):
        error = (recovered(artifact, t) - tau).norm() / tau.norm()
        assert error < 1e-6


def test_a_zero_task_is_recovered_as_zero() -> None:
    gen = generator(3)
    tau = randn(gen, 4, 3)
    taus = [tau, torch.zeros_like(tau), -2 * tau + randn(gen, 4, 3)]
    _, artifact, diag = run(taus, basis_size=2)
    assert diag["task_sq_norm"][1] == 0.0
    torch.testing.assert_close(recovered(artifact, 1), torch.zeros_like(tau),
                               rtol=0, atol=1e-12)


def test_deterministic_signs() -> None:
    """Each basis direction is signed by its largest Q entry (first of ties): reruns give
    identical bytes, and with T = 2 (Q = ±(1, −1)/√2) the first task's coefficient is
    positive."""
    gen = generator(4)
    taus = [randn(gen, 9, 3) for _ in range(4)]
    first, second = run(taus)[1], run(taus)[1]
    for key in first:
        assert torch.equal(first[key], second[key])
    for seed in range(5):
        gen = generator(seed)
        pair = run([randn(gen, 3, 3), randn(gen, 3, 3)], basis_size=1)[1]
        assert float(pair["0::coefficients"][0]) > 0 > float(pair["1::coefficients"][0])


def test_summarize_gives_whole_model_relative_errors() -> None:
    rmm = method("rmm", basis_size=1)
    gen = generator(5)
    layers = {f"layer.{i}": [randn(gen, 4, 4) for _ in range(3)] for i in range(2)}
    tensors, sq_err, sq_norm = {}, [0.0] * 3, [0.0] * 3
    for name, taus in layers.items():
        task = make_task(taus, name=name)
        artifact = rmm.merge(task).artifact
        tensors[name] = {"action": "merged", **task.diagnostics}
        for t, tau in enumerate(taus):
            sq_err[t] += float((tau - recovered(artifact, t)).square().sum())
            sq_norm[t] += float(tau.square().sum())
    tensors["copied.bias"] = {"action": "unchanged"}
    summary = rmm.summarize(tensors, ["a", "b", "c"])["recovery"]
    for t, name in enumerate("abc"):
        assert summary["relative_error"][name] == pytest.approx((sq_err[t] / sq_norm[t]) ** 0.5,
                                                                rel=1e-9)
    assert summary["basis_size"] == 1
    assert summary["tensors_by_kept_directions"] == {"1": 2}


@pytest.mark.parametrize(("params", "field"), [({"basis_size": 0}, "basis_size"),
                                               ({"alpha": float("nan")}, "alpha"),
                                               ({"rank": 2}, "rank")])
def test_bad_params_are_problems(params: dict, field: str) -> None:
    built, problems = build_method("rmm", params)
    assert built is None
    assert [p.field for p in problems] == [f"method.params.{field}"]


def test_reconstruct_names_missing_and_misfitting_parts() -> None:
    assert Rmm is not None
    with pytest.raises(InvalidInputError, match=r"missing part.*coefficients"):
        Rmm.reconstruct({"mu": torch.zeros(3), "basis": torch.zeros(1, 3)})
    with pytest.raises(InvalidInputError, match="do not fit"):
        Rmm.reconstruct({"mu": torch.zeros(3), "basis": torch.zeros(2, 3),
                         "coefficients": torch.zeros(1)})
    with pytest.raises(InvalidInputError, match="do not fit"):
        Rmm.reconstruct({"mu": torch.zeros(3), "basis": torch.zeros(1, 4),
                         "coefficients": torch.zeros(1)})
    with pytest.raises(InvalidInputError, match=r"unexpected part\(s\) U \(found U, basis"):
        Rmm.reconstruct({"mu": torch.zeros(3), "basis": torch.zeros(1, 3),
                         "coefficients": torch.zeros(1), "U": torch.zeros(3)})
