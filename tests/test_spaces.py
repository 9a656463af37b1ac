"""LoRA spaces (METHODS.md section 10): core and knots exactness, and the `lora` output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from merge_service.engine import run_merge
from merge_service.errors import PreflightError
from merge_service.methods import build_method
from merge_service.methods.base import TensorTask
from merge_service.spaces import core_space, knots_space
from merge_service.spec import spec_from_dict
from tests.conftest import job, offline, read_tensors, relative_error

F64 = torch.float64
# Methods that are functions of Σ_t ΔW_t only, so independent of the basis. DARE is linear for
# a fixed mask, but its mask drops entries of the core matrices, other coordinates than ΔW_t.
LINEAR = ["task_arithmetic", "iso_c"]


def random_factors(seed: int, m: int, n: int, ranks: list[int | None]):
    g = torch.Generator().manual_seed(seed)
    return [None if r is None else (torch.randn(r, n, generator=g, dtype=F64),
                                    torch.randn(m, r, generator=g, dtype=F64)) for r in ranks]


def delta(f) -> torch.Tensor:
    return f[1] @ f[0]


def run_rule(name: str, vectors: list[torch.Tensor], **params) -> torch.Tensor:
    method, problems = build_method(name, params)
    assert method is not None, problems
    task = TensorTask(name="layer.0.q_proj.weight", task_vectors=[v.clone() for v in vectors],
                      weights=[1.0] * len(vectors), is_2d=True)
    result = method.merge(task).delta
    assert result is not None
    return result


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), m=st.integers(2, 40), n=st.integers(2, 40),
       ranks=st.lists(st.one_of(st.none(), st.integers(1, 6)), min_size=2, max_size=4)
       .filter(lambda rs: any(r is not None for r in rs)))
def test_core_matrices_reconstruct_every_task_delta(seed, m, n, ranks) -> None:
    """`U_B M_t V_Aᵀ = ΔW_t`, with orthonormal `U_B`, `V_A` (all singular vectors)."""
    factors = random_factors(seed, m, n, ranks)
    space = core_space(factors)
    for f, core in zip(factors, space.cores, strict=True):
        expected = delta(f) if f is not None else torch.zeros(m, n, dtype=F64)
        assert relative_error(space.to_full(core), expected) < 1e-10 or not expected.any()
        assert space.to_full(core).sub(expected).abs().max() < 1e-9 * (1 + expected.abs().max())
    sigma_r = sum(r for r in ranks if r is not None)
    assert space.u_b.shape == (m, min(m, sigma_r))
    assert space.v_a.shape == (n, min(n, sigma_r))
    eye_u = torch.eye(space.u_b.shape[1], dtype=F64)
    assert torch.allclose(space.u_b.mT @ space.u_b, eye_u, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), ranks=st.lists(st.integers(1, 5), min_size=2, max_size=4))
def test_knots_blocks_reconstruct_every_task_delta(seed, ranks) -> None:
    """`ΔW_t = U R_t` and the singular values of `[ΔW_1 … ΔW_T]` are kept."""
    m, n = 30, 25
    factors = random_factors(seed, m, n, ranks)
    space = knots_space(factors, n)
    for f, block in zip(factors, space.blocks, strict=True):
        torch.testing.assert_close(space.to_full(block), delta(f), rtol=0, atol=1e-10)
    x = torch.cat([delta(f) for f in factors], dim=1)
    rank = int((torch.linalg.svdvals(x) > 1e-5 * torch.linalg.svdvals(x)[0]).sum())
    assert space.u.shape == (m, rank)


@pytest.mark.parametrize("which", ["core", "knots"])
def test_a_task_far_smaller_than_the_others_keeps_its_own_digits(which: str) -> None:
    """Float32 factors, one task 10⁷ times smaller than the others (a barely trained adapter):
    its small matrix is accurate relative to its own size, as `U_Bᵀ B_t A_t V_A` computed in
    float64 with the same bases says. Read off the shared SVD instead, its error would be
    relative to the largest task: 26% here, which drm's renormalisation would carry."""
    factors = [(a.float(), b.float()) for a, b in random_factors(5, 96, 80, [4, 4, 4])]
    factors[1] = (factors[1][0], factors[1][1] * 1e-7)
    space = core_space(factors) if which == "core" else knots_space(factors, 80)
    small = (space.cores if which == "core" else space.blocks)[1].double()
    a, b = (x.double() for x in factors[1])
    if which == "core":
        exact = space.u_b.double().mT @ b @ a @ space.v_a.double()
    else:  # R_t = Uᵀ ΔW_t with the orthonormal U
        exact = space.u.double().mT @ b @ a
    assert torch.linalg.norm(small - exact) <= 1e-5 * torch.linalg.norm(exact)


@pytest.mark.parametrize("which", ["core", "knots"])
@pytest.mark.parametrize("zero", ["A", "B"])
@pytest.mark.parametrize(("m", "n"), [(40, 6), (12, 9), (20, 30), (64, 48)])
def test_a_task_with_a_zero_update_has_an_exactly_zero_small_matrix(which, zero, m, n) -> None:
    """`M_t = U_Bᵀ B_t A_t V_A` (and KnOTS' `R_t`, task t's part of `diag(σ) Vᵀ`) is 0 when
    `B_t A_t = 0`, as for a weight of 0 folded into `B_t`: exactly, not rounding noise, which
    the rules that trim, count or elect non-zero entries or take singular vectors would treat
    as a task (ties with noise for the zero task differed from ties without it by 10-60%)."""
    factors = random_factors(11, m, n, [3, 2, 4])
    a, b = factors[1]
    factors[1] = (torch.zeros_like(a), b) if zero == "A" else (a, torch.zeros_like(b))
    space = core_space(factors) if which == "core" else knots_space(factors, n)
    small = space.cores if which == "core" else space.blocks
    assert torch.equal(small[1], torch.zeros_like(small[1]))
    for f, x in zip(factors, small, strict=True):  # the others still reconstruct their ΔW_t
        torch.testing.assert_close(space.to_full(x), delta(f), rtol=0, atol=1e-10)
    exact = [x.clone() for x in small]
    exact[1].zero_()
    for name, params in [("ties", {"density": 0.5}), ("tsv", {}), ("drm", {"drop_rate": 0.5})]:
        torch.testing.assert_close(space.to_full(run_rule(name, small, **params)),
                                   space.to_full(run_rule(name, exact, **params)),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("which", ["core", "knots"])
def test_linear_methods_in_core_and_knots_equal_full_space(name: str, which: str) -> None:
    factors = random_factors(3, 48, 36, [4, 8, None, 2])
    full = run_rule(name, [delta(f) if f else torch.zeros(48, 36, dtype=F64) for f in factors])
    if which == "core":
        space = core_space(factors)
        small = space.cores
    else:
        space = knots_space(factors, 36)
        small = space.blocks
    torch.testing.assert_close(space.to_full(run_rule(name, small)), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", ["core", "knots"])
def test_tsv_in_core_and_knots_equals_full_space_when_k_is_capped_at_rank(which: str) -> None:
    """Equal ranks r: in core space Σr // T = r, so k_t = rank(ΔW_t) as in full space."""
    factors = random_factors(5, 64, 48, [4, 4, 4])
    full = run_rule("tsv", [delta(f) for f in factors])
    space = core_space(factors) if which == "core" else knots_space(factors, 48)
    small = space.cores if which == "core" else space.blocks
    torch.testing.assert_close(space.to_full(run_rule("tsv", small)), full, rtol=0, atol=1e-10)


def test_lora_factors_of_the_core_merge_and_target_rank_truncation() -> None:
    factors = random_factors(7, 40, 30, [3, 5])
    space = core_space(factors)
    merged = run_rule("task_arithmetic", space.cores, alpha=1.0)
    a, b = space.to_lora(merged)
    assert a.shape == (8, 30) and b.shape == (40, 8)  # r' = columns of V_A = Σr
    torch.testing.assert_close(b @ a, delta(factors[0]) + delta(factors[1]), rtol=0, atol=1e-10)
    a2, b2 = space.to_lora(merged, target_rank=3)
    expected = torch.linalg.svd(b @ a)
    best = (expected.U[:, :3] * expected.S[:3]) @ expected.Vh[:3]
    torch.testing.assert_close(b2 @ a2, best, rtol=0, atol=1e-10)  # the best rank-3 fit


@pytest.mark.parametrize("target_rank", [4, 5, 11, 12, 20])
def test_target_rank_between_the_core_sides_truncates_exactly(target_rank: int) -> None:
    """A narrow module (m = 4) under two rank-6 adapters: M̄ is 4 × 12, so any target rank
    from 4 up (also at or above q = 12) gives an exact adapter of rank 4, not one of rank 12:
    `B' = U_B P S`, `A' = Qᵀ V_Aᵀ` over the 4 singular triplets of `M̄` (METHODS.md
    section 10)."""
    factors = random_factors(8, 4, 30, [6, 6])
    space = core_space(factors)
    merged = run_rule("task_arithmetic", space.cores, alpha=1.0)
    assert merged.shape == (4, 12)
    a, b = space.to_lora(merged, target_rank=target_rank)
    assert a.shape == (4, 30) and b.shape == (4, 4)
    torch.testing.assert_close(b @ a, delta(factors[0]) + delta(factors[1]), rtol=0, atol=1e-10)
    a_plain, _ = space.to_lora(merged)
    assert a_plain.shape == (12, 30)  # without target_rank: r' = columns of V_A


# ---------------------------------------------------------------------------------------------
# end to end on MiniLM adapters built by peft


def _merge(tmp_path: Path, minilm_dir: Path, adapters: list[Path], name: str, **fields):
    spec = job(minilm_dir, adapters, tmp_path / name, **fields)
    spec["options"] = {"compute_dtype": "float64", **spec.get("options", {})}
    return run_merge(spec_from_dict(spec))


def test_lora_output_loads_in_peft_and_equals_the_full_output(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path]) -> None:
    """Adapters of different ranks and targets; the lora output merged by peft itself equals
    our full output, and its config has rank_pattern/alpha_pattern where ranks differ."""
    from peft import PeftModel
    from transformers import AutoModel

    adapters = [minilm_adapters["rslora"], minilm_adapters["pattern"]]
    params = {"alpha": 1.0}
    full = _merge(tmp_path, minilm_dir, adapters, "full", params=params, space="core")
    lora = _merge(tmp_path, minilm_dir, adapters, "lora", params=params, space="core",
                  output={"format": "lora"})
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(lora.files)
    config = json.loads((lora.destination / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["rank_pattern"]
    assert config["alpha_pattern"] == config["rank_pattern"]
    # keyed by whole module names, which every PEFT release finds (older ones by exact lookup)
    assert set(config["rank_pattern"]) < set(config["target_modules"])
    card = (lora.destination / "README.md").read_text()
    assert "base_model_relation: adapter" in card
    with offline():
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_dir),
                                          lora.destination).merge_and_unload()
    merged = model.state_dict()
    expected = read_tensors(full.destination)
    for name, value in expected.items():
        if name in merged:
            assert relative_error(merged[name], value) < 1e-5, name


def test_the_resolved_spec_names_the_space_auto_chose(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path]) -> None:
    """merge_spec.yaml reruns the merge as it ran, whatever `auto` means in a later version."""
    from merge_service.spec import load_spec

    adapters = [minilm_adapters["rslora"], minilm_adapters["pattern"]]
    result = _merge(tmp_path, minilm_dir, adapters, "auto", method="ties")
    assert result.spec.space == "core"
    assert load_spec(result.destination / "merge_spec.yaml").space == "core"
    assert result.report["space"] == "core"


def test_lora_output_is_written_in_place(tmp_path: Path, minilm_dir: Path,
                                        minilm_adapters: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine announces every key of the adapter file (LoRA modules and the pooler that
    `qv` carries whole), so its data is never moved behind a grown header."""
    def moved(*_args: object) -> None:
        raise AssertionError("the adapter's data was moved")

    monkeypatch.setattr("merge_service.sinks.safetensors_writer._copy_from", moved)
    result = _merge(tmp_path, minilm_dir, [minilm_adapters["qv"], minilm_adapters["pattern"]],
                    "lora", space="core", params={"alpha": 1.0}, output={"format": "lora"})
    with safe_open(str(result.destination / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any("pooler" in k and "lora" not in k for k in keys)
    assert sum(k.endswith("lora_A.weight") for k in keys) == \
        sum("rank" in t for t in result.report["tensors"].values())


def test_target_rank_truncates_every_module(tmp_path: Path, minilm_dir: Path,
                                            minilm_adapters: dict[str, Path]) -> None:
    adapters = [minilm_adapters["qv"], minilm_adapters["pattern"]]
    result = _merge(tmp_path, minilm_dir, adapters, "lora", space="core",
                    params={"alpha": 1.0, "target_rank": 2}, output={"format": "lora"})
    ranks = [t["rank"] for t in result.report["tensors"].values() if "rank" in t]
    assert ranks and all(r == 2 for r in ranks)
    config = json.loads((result.destination / "adapter_config.json").read_text())
    assert config["r"] == 2


@pytest.mark.parametrize("fields, expected", [
    ({"space": "full", "output": {"format": "lora"}}, "core space"),
    ({"space": "knots", "output": {"format": "lora"}}, "core space"),
    ({"space": "core", "params": {"target_rank": 4}}, "target_rank"),
    ({"space": "core", "output": {"format": "lora"}, "params": {"target_rank": 0}},
     "positive integer"),
])
def test_lora_output_problems(tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path],
                              fields: dict, expected: str) -> None:
    adapters = [minilm_adapters["qv"], minilm_adapters["rslora"]]
    with pytest.raises(PreflightError, match=expected):
        _merge(tmp_path, minilm_dir, adapters, "out", **fields)
    assert not (tmp_path / "out").exists()


def test_lora_output_for_full_checkpoints_is_refused(
        tmp_path: Path, minilm_dir: Path, minilm_finetunes) -> None:
    models = [ft.path for ft in minilm_finetunes[:2]]
    with pytest.raises(PreflightError, match="needs LoRA adapters"):
        _merge(tmp_path, minilm_dir, models, "out", output={"format": "lora"})
    assert not (tmp_path / "out").exists()
