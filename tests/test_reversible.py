"""`rmm` with the `reversible` artifact (METHODS.md section 13) through `run_merge`, `revert`
and the CLI: full checkpoints and LoRA adapters, real files, real transformers/peft loading."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_service.cli import main
from merge_service.engine import MergeResult, run_merge
from merge_service.errors import CorruptTensorError, InvalidInputError, PreflightError
from merge_service.revert import revert
from merge_service.spec import load_spec, spec_from_dict
from tests.conftest import (
    assert_nothing_written,
    build_adapter,
    job,
    offline,
    peft_merged_state,
    perturbed,
    read_tensors,
    relative_error,
    synthetic_tensors,
    write_checkpoint,
    write_spec,
)

pytestmark = pytest.mark.usefixtures("hf_offline")

TASKS = ("math", "code", "poetry")
ARTIFACT_FILES = {"basis.safetensors", "coefficients.safetensors", "tasks.json",
                  "merge_spec.yaml", "merge_report.json", "README.md"}


def merge(base: Path, models: list[Path], out: Path, names=TASKS, **fields) -> MergeResult:
    entries = [{"source": str(m), "name": n} for m, n in zip(models, names, strict=True)]
    params = fields.pop("params", {})
    return run_merge(spec_from_dict(job(base, entries, out, method="rmm", params=params,
                                        output={"format": "reversible"}, **fields)))


def floats(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if v.is_floating_point()}


def whole_model_error(recovered: dict[str, torch.Tensor], task: dict[str, torch.Tensor],
                      base: dict[str, torch.Tensor]) -> float:
    """`‖τ_t − τ̂_t‖ / ‖τ_t‖` over every floating tensor, in float64."""
    err = sum(float((recovered[k].double() - task[k].double()).square().sum())
              for k in floats(base))
    norm = sum(float((task[k].double() - base[k].double()).square().sum()) for k in floats(base))
    return (err / norm) ** 0.5


# ---------------------------------------------------------------------------------------------
# full checkpoints, float64 end to end


class Float64Tasks:
    """A float64 synthetic base and three task models (the output dtype is the base's)."""

    def __init__(self, root: Path) -> None:
        self.base_tensors = {k: v.double() if v.is_floating_point() else v
                             for k, v in synthetic_tensors(0).items()}
        self.task_tensors = [perturbed(self.base_tensors, seed, scale=0.1) for seed in (1, 2, 3)]
        self.base = write_checkpoint(root / "base", self.base_tensors)
        (self.base / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
        self.tasks = [write_checkpoint(root / n, t) for n, t in zip(TASKS, self.task_tensors,
                                                                     strict=True)]


@pytest.fixture
def f64(tmp_path: Path) -> Float64Tasks:
    return Float64Tasks(tmp_path / "inputs")


def test_full_artifact_layout_and_served_model(f64: Float64Tasks, tmp_path: Path) -> None:
    result = merge(f64.base, f64.tasks, tmp_path / "art", params={"alpha": 0.5},
                   options={"compute_dtype": "float64"})
    art = result.destination
    assert ARTIFACT_FILES | {"model.safetensors", "config.json"} == set(result.files)
    manifest = json.loads((art / "tasks.json").read_text())
    assert manifest["tasks"] == list(TASKS) and manifest["method"] == "rmm"
    assert manifest["format"] == "reversible" and manifest["served_format"] == "full"
    assert manifest["files"] == ["basis", "coefficients"]

    served = read_tensors(art)
    basis, coefficients = load_file(art / "basis.safetensors"), \
        load_file(art / "coefficients.safetensors")
    for name, theta0 in f64.base_tensors.items():
        if not theta0.is_floating_point():  # integer buffer: copied, nothing stored
            assert torch.equal(served[name], theta0)
            assert not any(k.startswith(f"{name}::") for k in basis)
            continue
        mean = sum(t[name] - theta0 for t in f64.task_tensors) / 3
        torch.testing.assert_close(served[name], theta0 + 0.5 * mean, rtol=1e-12, atol=1e-12)
        # every tensor with a non-zero delta (matrices, biases, norms, embeddings) gets μ, Φ, c
        torch.testing.assert_close(basis[f"{name}::shared::mu"], mean, rtol=1e-12, atol=1e-12)
        assert basis[f"{name}::shared::basis"].shape == (2, *theta0.shape)
        assert all(coefficients[f"{name}::{t}::coefficients"].shape == (2,) for t in range(3))
    card = (art / "README.md").read_text()
    assert "merge-service revert" in card and "base_model_relation: merge" in card
    report = result.report
    assert report["output"]["bytes_by_file"]["basis"] == sum(
        v.numel() * 8 for v in basis.values())
    eig = report["tensors"]["layers.0.mlp.up_proj.weight"]["eigenvalues"]
    assert len(eig) == 3 and eig[0] >= eig[1] >= eig[2] >= 0


@pytest.mark.parametrize("basis_size", [2, 3])
def test_revert_is_exact_at_basis_size_t_minus_1(f64: Float64Tasks, tmp_path: Path,
                                                 basis_size: int) -> None:
    result = merge(f64.base, f64.tasks, tmp_path / "art", params={"basis_size": basis_size},
                   options={"compute_dtype": "float64"})
    for name, error in result.report["recovery"]["relative_error"].items():
        assert error < 1e-12, name
    for t, task in enumerate(TASKS):
        out = revert(result.destination, task, tmp_path / f"rev-{task}").destination
        recovered = read_tensors(out)
        assert set(recovered) == set(f64.base_tensors)
        assert (out / "config.json").is_file()
        # like every output: the spec (the artifact's), a report and a card
        assert load_spec(out / "merge_spec.yaml") == load_spec(result.destination
                                                               / "merge_spec.yaml")
        assert json.loads((out / "merge_report.json").read_text())["reverted_task"] == task
        front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
        assert front["base_model_relation"] == "finetune"
        for name, value in f64.task_tensors[t].items():
            assert recovered[name].dtype == value.dtype
            if value.is_floating_point():
                torch.testing.assert_close(recovered[name], value, rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(recovered[name], value)


def test_report_errors_are_the_reverted_models_errors(f64: Float64Tasks, tmp_path: Path) -> None:
    """At p = 1 < T − 1: each task's whole-model relative error in the report is that of the
    reverted model, and Σ_t ‖τ_t − τ̂_t‖² over the model is the sum of dropped eigenvalues."""
    result = merge(f64.base, f64.tasks, tmp_path / "art", params={"basis_size": 1},
                   options={"compute_dtype": "float64"})
    recovery = result.report["recovery"]
    total_sq = 0.0
    for t, task in enumerate(TASKS):
        recovered = read_tensors(revert(result.destination, task,
                                        tmp_path / f"rev-{task}").destination)
        error = whole_model_error(recovered, f64.task_tensors[t], f64.base_tensors)
        assert 0.05 < error < 1
        assert recovery["relative_error"][task] == pytest.approx(error, rel=1e-9)
        total_sq += sum(float((recovered[k] - f64.task_tensors[t][k]).square().sum())
                        for k in floats(f64.base_tensors))
    dropped = sum(sum(info["eigenvalues"][1:]) for info in result.report["tensors"].values())
    assert total_sq == pytest.approx(dropped, rel=1e-9)
    assert recovery["dropped_eigenvalue_sum"] == pytest.approx(dropped, rel=1e-9)


@pytest.mark.parametrize(("method", "fmt"), [("rmm", "reversible"),
                                            ("tsv_compress", "compressed")])
def test_weights_are_refused_by_methods_that_recover_each_task(
        method: str, fmt: str, f64: Float64Tasks, tmp_path: Path) -> None:
    entries = [{"source": str(m), "name": n, "weight": w}
               for m, n, w in zip(f64.tasks, TASKS, (2.0, 1.0, -1.0), strict=True)]
    spec = job(f64.base, entries, tmp_path / "art", method=method,
               output={"format": fmt}, options={"compute_dtype": "float64"})
    with pytest.raises(InvalidInputError) as refused:
        run_merge(spec_from_dict(spec))
    assert [(p.field, p.model) for p in refused.value.problems] == [
        ("models.0.weight", str(f64.tasks[0])), ("models.2.weight", str(f64.tasks[2]))]
    assert f"{method} does not use per-model weights" in str(refused.value)
    assert "found weight 2, expected none or 1" in str(refused.value)
    assert not (tmp_path / "art").exists()
    # a weight of 1 is the default written out: accepted
    entries[0]["weight"] = entries[2]["weight"] = 1.0
    art = run_merge(spec_from_dict(spec)).destination
    recovered = read_tensors(revert(art, "code", tmp_path / "rev").destination)
    if method == "rmm":  # exact at basis_size T - 1 (tsv_compress keeps rank r // T)
        for name, value in floats(f64.task_tensors[1]).items():
            torch.testing.assert_close(recovered[name], value, rtol=1e-12, atol=1e-12)


def test_merge_and_revert_through_the_cli(f64: Float64Tasks, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    entries = [{"source": str(m), "name": n} for m, n in zip(f64.tasks, TASKS, strict=True)]
    spec = write_spec(tmp_path, **job(f64.base, entries, tmp_path / "unused", method="rmm",
                                      output={"format": "reversible"},
                                      options={"compute_dtype": "float64"}))
    art = tmp_path / "art"
    code = main(["merge", str(spec), "--out", str(art), "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "merged 3 models with rmm" in out and "output: reversible" in out
    code = main(["revert", str(art), "--task", "poetry", "--out", str(tmp_path / "rev"), "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "recovered task 'poetry'" in out
    recovered = read_tensors(tmp_path / "rev")
    for name, value in floats(f64.task_tensors[2]).items():
        torch.testing.assert_close(recovered[name], value, rtol=1e-12, atol=1e-12)

    code = main(["revert", str(art), "--task", "prose", "--out", str(tmp_path / "rev2")])
    _, err = capsys.readouterr()
    assert code == 1 and "no task 'prose'" in err
    assert all(t in err for t in TASKS) and "Traceback" not in err
    assert_nothing_written(tmp_path / "rev2")


# ---------------------------------------------------------------------------------------------
# bad artifacts and bad specs: clear errors, nothing written


@pytest.fixture
def artifact(f64: Float64Tasks, tmp_path: Path) -> Path:
    return merge(f64.base, f64.tasks, tmp_path / "art",
                 options={"compute_dtype": "float64"}).destination


def _refused(artifact_dir: Path, out: Path, match: str, task: str = "math") -> None:
    with pytest.raises(InvalidInputError, match=match):
        revert(artifact_dir, task, out)
    assert_nothing_written(out)


def test_not_an_artifact(f64: Float64Tasks, tmp_path: Path) -> None:
    _refused(f64.base, tmp_path / "rev", "is not a compressed or reversible artifact")


def test_unknown_task_lists_the_known_ones(artifact: Path, tmp_path: Path) -> None:
    _refused(artifact, tmp_path / "rev", r"no task 'prose'.*math, code, poetry", task="prose")


def test_truncated_basis_file(artifact: Path, tmp_path: Path) -> None:
    path = artifact / "basis.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _refused(artifact, tmp_path / "rev", "basis.safetensors: truncated")


def test_missing_coefficients_file(artifact: Path, tmp_path: Path) -> None:
    (artifact / "coefficients.safetensors").unlink()
    _refused(artifact, tmp_path / "rev", "no coefficients.safetensors")


def test_parts_that_do_not_fit(artifact: Path, tmp_path: Path) -> None:
    """A coefficient vector of the wrong length: found from the headers, nothing written."""
    path = artifact / "coefficients.safetensors"
    tensors = load_file(path)
    key = "layers.1.mlp.down_proj.weight::0::coefficients"
    tensors[key] = torch.zeros(5, dtype=torch.float64)
    save_file(tensors, path)
    _refused(artifact, tmp_path / "rev", r"layers\.1\.mlp\.down_proj\.weight.*do not fit")


def test_missing_part(artifact: Path, tmp_path: Path) -> None:
    path = artifact / "basis.safetensors"
    tensors = load_file(path)
    del tensors["norm.weight::shared::basis"]
    save_file(tensors, path)
    _refused(artifact, tmp_path / "rev", r"norm\.weight.*missing part\(s\) basis")


def _rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


UP = "layers.0.mlp.up_proj.weight"  # 16 × 8 in the base; 2 basis directions kept


@pytest.mark.parametrize(("file", "change", "message"), [
    # an integer part would truncate the values (or write the weight as integers)
    ("coefficients", lambda t: t.update({f"{UP}::0::coefficients": torch.ones(2).long()}),
     f"artifact / {UP}: part coefficients is stored as torch.int64, expected a floating-point "
     "dtype"),
    ("basis", lambda t: t.update({f"{UP}::shared::basis": torch.zeros(2, 8, 16).double()}),
     f"artifact / {UP}: reversible artifact parts do not fit together: mu [16, 8], basis "
     "[2, 8, 16], coefficients [2]"),
    ("basis", lambda t: t.update({f"{UP}::shared::basis": torch.zeros(2, 8, 16).double(),
                                  f"{UP}::shared::mu": torch.zeros(8, 16).double()}),
     f"artifact / {UP}: the recovered delta has shape [8, 16] (from basis [2, 8, 16], "
     "coefficients [2], mu [8, 16]), the base tensor [16, 8]"),
    ("coefficients", lambda t: t.update({f"{UP}::0::scale": torch.ones(2).double()}),
     f"artifact / {UP}: reversible artifact has unexpected part(s) scale (found basis, "
     "coefficients, mu, scale; expected mu, basis, coefficients)"),
    ("coefficients", lambda t: t.update({f"{UP}::3::coefficients": torch.ones(2).double()}),
     f"artifact: tensor '{UP}::3::coefficients' has task index '3' (expected 0 to 2 for the "
     "tasks math, code, poetry, or shared)"),
    ("coefficients", lambda t: t.update({f"{UP}::x::coefficients": torch.ones(2).double()}),
     f"artifact: tensor '{UP}::x::coefficients' has task index 'x' (expected 0 to 2"),
    ("basis", lambda t: t.update({"position_ids::shared::mu": torch.zeros(1, 20).double(),
                                  "position_ids::shared::basis": torch.zeros(2, 1, 20).double()}),
     "artifact / position_ids: stored in the artifact, but the base tensor is torch.int64, not "
     "floating point"),
], ids=["integer", "misfit", "wrong-shape", "unknown-part", "task-index", "task-index-x",
        "integer-base"])
def test_damaged_parts_are_refused_before_writing(
        artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str,
        change: Callable[[dict[str, torch.Tensor]], object], message: str) -> None:
    """Every part's dtype and shape is checked against the base from the headers: exit 1,
    a message naming the tensor and the part, nothing written (a wrong shape was a
    RuntimeError, exit 2; an integer part was accepted)."""
    _rewrite(artifact / f"{file}.safetensors", change)
    code = main(["revert", str(artifact), "--task", "math", "--out", str(tmp_path / "rev")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert message in err, err
    assert_nothing_written(tmp_path / "rev")


def test_problems_with_parts_are_capped(artifact: Path, tmp_path: Path) -> None:
    _rewrite(artifact / "coefficients.safetensors",
             lambda t: t.update({f"ghost.{i:02d}::0::coefficients": torch.ones(2).double()
                                 for i in range(25)}))
    with pytest.raises(InvalidInputError) as info:
        revert(artifact, "math", tmp_path / "rev")
    assert [p.tensor for p in info.value.problems[:20]] == [f"ghost.{i:02d}" for i in range(20)]
    assert [str(p) for p in info.value.problems[20:]] == ["artifact: ... and 5 more problems"]
    assert_nothing_written(tmp_path / "rev")


def test_an_empty_out_is_named_as_such(artifact: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out ''` is not the working directory (which exists)."""
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["revert", str(artifact), "--task", "math", "--out", ""])
    err = capsys.readouterr().err
    assert code == 1
    assert err == "error: --out: the destination is empty: give a directory for the recovered " \
                  "model\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_non_finite_values_in_the_basis(artifact: Path, tmp_path: Path) -> None:
    path = artifact / "basis.safetensors"
    tensors = load_file(path)
    tensors["layers.0.self_attn.q_proj.bias::shared::mu"][2] = float("nan")
    save_file(tensors, path)
    with pytest.raises(CorruptTensorError, match=r"q_proj\.bias.*NaN or Inf"):
        revert(artifact, "math", tmp_path / "rev")
    assert_nothing_written(tmp_path / "rev")


def test_tasks_json_naming_another_method(artifact: Path, tmp_path: Path) -> None:
    manifest = json.loads((artifact / "tasks.json").read_text())
    (artifact / "tasks.json").write_text(json.dumps({**manifest, "method": "tsv"}))
    _refused(artifact, tmp_path / "rev", "names method 'tsv', which does not write")


def test_existing_destination(artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "rev").mkdir()
    with pytest.raises(InvalidInputError, match="already exists"):
        revert(artifact, "math", tmp_path / "rev")


def test_overwrite_never_replaces_the_artifact(artifact: Path) -> None:
    files = sorted(p.name for p in artifact.iterdir())
    for out in (artifact, artifact.parent):
        with pytest.raises(InvalidInputError, match="--overwrite would delete"):
            revert(artifact, "math", out, overwrite=True)
    assert sorted(p.name for p in artifact.iterdir()) == files


@pytest.mark.parametrize(("method", "fmt", "match"), [
    ("tsv", "reversible", "cannot produce format 'reversible'.*written by: rmm"),
    ("rmm", "full", r"method rmm cannot produce format 'full' \(it produces: reversible\)"),
    ("rmm", "compressed", "written by: tsv_compress"),
])
def test_format_and_method_go_together(f64: Float64Tasks, tmp_path: Path, method: str,
                                       fmt: str, match: str) -> None:
    spec = job(f64.base, f64.tasks, tmp_path / "out", method=method, output={"format": fmt})
    with pytest.raises(PreflightError, match=match):
        run_merge(spec_from_dict(spec))
    assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# transformers and peft


def test_served_and_reverted_models_load_with_transformers(tiny_bert_dir: Path,
                                                           tmp_path: Path) -> None:
    from transformers import AutoModel

    base = load_file(tiny_bert_dir / "model.safetensors")
    tasks = [write_checkpoint(tmp_path / n, perturbed(base, s), copy_from=tiny_bert_dir)
             for s, n in enumerate(TASKS, 1)]
    result = merge(tiny_bert_dir, tasks, tmp_path / "art", params={"alpha": 2.0})
    expected = {k: v + 2.0 * sum(read_tensors(t)[k] - v for t in tasks) / 3
                for k, v in floats(base).items()}
    with offline():
        served = AutoModel.from_pretrained(result.destination).state_dict()
        reverted = AutoModel.from_pretrained(
            revert(result.destination, "code", tmp_path / "rev").destination).state_dict()
    code = read_tensors(tasks[1])
    for name, value in expected.items():
        assert relative_error(served[name], value) < 1e-6, name
        assert relative_error(reverted[name], code[name]) < 1e-6, name


@pytest.fixture(scope="module")
def tiny_lora(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three adapters of the tiny BERT: different ranks and targets, one saves the pooler."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("rmm_lora")
    configs = [{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
               {"r": 2, "lora_alpha": 2, "target_modules": ["query", "key", "dense"],
                "use_rslora": True},
               {"r": 3, "lora_alpha": 6, "target_modules": ["value", "dense"],
                "modules_to_save": ["pooler"]}]
    with offline():
        return [build_adapter(AutoModel.from_pretrained(tiny_bert_dir), root / n, 20 + i, **c)
                for i, (n, c) in enumerate(zip(TASKS, configs, strict=True))]


def test_lora_artifact_serves_a_peft_adapter_and_reverts_each_adapter(
        tiny_bert_dir: Path, tiny_lora: list[Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    result = merge(tiny_bert_dir, tiny_lora, tmp_path / "art", params={"alpha": 0.5},
                   options={"compute_dtype": "float64"})
    art = result.destination
    assert ARTIFACT_FILES | {"adapter_config.json", "adapter_model.safetensors"} \
        == set(result.files)
    assert result.report["space"] == "core"
    assert json.loads((art / "tasks.json").read_text())["served_format"] == "lora"
    assert "base_model_relation: adapter" in (art / "README.md").read_text()

    base = floats(load_file(tiny_bert_dir / "model.safetensors"))
    each = [peft_merged_state(tiny_bert_dir, [a]) for a in tiny_lora]
    with offline():
        served = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert_dir),
                                           art).merge_and_unload().state_dict()
    changed = 0
    for name, theta0 in base.items():
        expected = theta0.double() + 0.5 * sum(e[name].double() - theta0 for e in each) / 3
        if not torch.equal(expected.float(), theta0):
            changed += 1
        assert relative_error(served[name], expected) < 1e-6, name
    assert changed > 10

    for t, task in enumerate(TASKS):
        if t < 2:
            recovered = read_tensors(revert(art, task, tmp_path / f"rev-{task}").destination)
        else:  # the CLI, for the adapter with a modules_to_save pooler
            assert main(["revert", str(art), "--task", task, "--out",
                         str(tmp_path / f"rev-{task}"), "-q"]) == 0, capsys.readouterr().err
            recovered = read_tensors(tmp_path / f"rev-{task}")
        for name in base:
            assert relative_error(recovered[name], each[t][name]) < 1e-6, (task, name)
        assert whole_model_error(recovered, each[t], base) < 1e-6
    assert max(result.report["recovery"]["relative_error"].values()) < 1e-10


def test_lora_in_knots_space_is_refused(tiny_bert_dir: Path, tiny_lora: list[Path],
                                       tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="rmm does not run in 'knots' space"):
        merge(tiny_bert_dir, tiny_lora, tmp_path / "art", space="knots")
    assert_nothing_written(tmp_path / "art")


def test_lora_core_artifact_grows_with_the_ranks_not_the_matrix(
        minilm_dir: Path, minilm_adapters: dict[str, Path], tmp_path: Path) -> None:
    """MiniLM adapters of ranks 8, 4 and 2..8: per module the basis file holds U_B (m × Σr),
    V_A (n × Σr) and (1 + k) Σr × Σr cores; the same merge in full space stores m × n
    matrices. Both revert to the same task model."""
    adapters = list(minilm_adapters.values())
    names = list(minilm_adapters)
    core = merge(minilm_dir, adapters, tmp_path / "core", names=names, space="core")
    full = merge(minilm_dir, adapters, tmp_path / "full", names=names, space="full")
    core_basis = load_file(core.destination / "basis.safetensors")
    full_basis = load_file(full.destination / "basis.safetensors")

    ranks = {}  # module -> Σr over the adapters that adapt it
    for path in adapters:
        cfg = json.loads((path / "adapter_config.json").read_text())
        for key, value in load_file(path / "adapter_model.safetensors").items():
            if ".lora_A." in key:
                target = key.removeprefix("base_model.model.").replace(".lora_A", "")
                ranks[target] = ranks.get(target, 0) + value.shape[0]
        assert cfg["peft_type"] == "LORA"
    assert ranks
    core_numel = full_numel = 0
    for target, sigma_r in ranks.items():
        if target.startswith("pooler."):  # `qv` saves the pooler whole: it has no core form
            assert f"{target}::shared::u_b" not in core_basis
            continue
        m, n = full_basis[f"{target}::shared::mu"].shape
        kept = core.report["tensors"][target]["kept"]
        assert core_basis[f"{target}::shared::u_b"].shape == (m, min(m, sigma_r))
        assert core_basis[f"{target}::shared::v_a"].shape == (n, min(n, sigma_r))
        assert core_basis[f"{target}::shared::mu"].shape == (min(m, sigma_r), min(n, sigma_r))
        assert core_basis[f"{target}::shared::basis"].shape == (kept, min(m, sigma_r),
                                                                min(n, sigma_r))
        core_numel += sum(core_basis[f"{target}::shared::{p}"].numel()
                          for p in ("u_b", "v_a", "mu", "basis"))
        full_numel += sum(full_basis[f"{target}::shared::{p}"].numel() for p in ("mu", "basis"))
    assert core_numel * 10 < full_numel
    assert core.report["output"]["bytes"] * 5 < full.report["output"]["bytes"]

    a = read_tensors(revert(core.destination, "rslora", tmp_path / "rev-core").destination)
    b = read_tensors(revert(full.destination, "rslora", tmp_path / "rev-full").destination)
    reference = peft_merged_state(minilm_dir, [minilm_adapters["rslora"]])
    for name, value in floats(load_file(minilm_dir / "model.safetensors")).items():
        assert relative_error(a[name], b[name]) < 1e-6, name
        assert relative_error(a[name], reference[name]) < 1e-6, name
        del value


# ---------------------------------------------------------------------------------------------
# real MiniLM weights


def test_minilm_three_finetunes(minilm_dir: Path, minilm_finetunes, tmp_path: Path) -> None:
    """Three MiniLM fine-tunes (one sharded by transformers): at p = T − 1 = 2 revert gives
    each task model back to float32 rounding; at p = 1 the report's errors are the reverted
    models' errors. The served model loads and embeds text."""
    from tests.test_minilm import embed

    base = load_file(minilm_dir / "model.safetensors")
    models = [ft.path for ft in minilm_finetunes]
    tasks = [read_tensors(p) for p in models]
    exact = merge(minilm_dir, models, tmp_path / "p2", params={"basis_size": 2})
    assert max(exact.report["recovery"]["relative_error"].values()) < 1e-5
    for t, task in enumerate(TASKS):
        recovered = read_tensors(revert(exact.destination, task,
                                        tmp_path / f"rev2-{task}").destination)
        for name, value in tasks[t].items():
            if value.is_floating_point():
                assert relative_error(recovered[name], value) < 1e-6, (task, name)
        assert whole_model_error(recovered, tasks[t], base) < 1e-5
    with offline():
        assert torch.isfinite(embed(exact.destination, minilm_dir)).all()

    approx = merge(minilm_dir, models, tmp_path / "p1", params={"basis_size": 1})
    recovered = read_tensors(revert(approx.destination, "code", tmp_path / "rev1").destination)
    error = whole_model_error(recovered, tasks[1], base)
    assert 0.1 < error < 1
    assert approx.report["recovery"]["relative_error"]["code"] == pytest.approx(error, rel=1e-4)
    assert approx.report["output"]["size_ratio"] == pytest.approx(1.0, rel=0.01)
    assert exact.report["output"]["size_ratio"] == pytest.approx(4 / 3, rel=0.01)
