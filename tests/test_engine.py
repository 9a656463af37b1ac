"""The engine (`run_merge`): progress, cancel, selection, dtypes, outputs, atomicity."""

from __future__ import annotations

import json
import re
from concurrent.futures import Executor
from pathlib import Path

import pytest
import torch
import yaml

from merge_service import __version__, engine
from merge_service.engine import Progress, execute, prepare, run_merge
from merge_service.errors import CorruptTensorError, MergeCancelled, PreflightError
from merge_service.methods import SumOfTerms, TensorTask, available, build_method
from merge_service.sources.checkpoint import Checkpoint
from merge_service.spec import load_spec, spec_from_dict
from tests.conftest import (
    Synthetic,
    assert_nothing_written,
    job,
    leftovers,
    perturbed,
    read_tensors,
    write_checkpoint,
)


def merge(syn: Synthetic, out: Path, **fields) -> dict:
    """Run a merge of the synthetic tasks; return the report."""
    return run_merge(spec_from_dict(job(syn.base, syn.tasks, out, **fields))).report


def expected_ta(syn: Synthetic, name: str, alpha: float = 0.3,
                weights: tuple[float, ...] = (1.0, 1.0)) -> torch.Tensor:
    theta0 = syn.base_tensors[name]
    return theta0 + alpha * sum(w * (t[name] - theta0)
                                for w, t in zip(weights, syn.task_tensors, strict=True))


# --------------------------------------------------------------------------------------------
# progress and cancel


def test_progress_stages_and_counts(synthetic: Synthetic, tmp_path: Path) -> None:
    events: list[Progress] = []
    run_merge(spec_from_dict(job(synthetic.base, synthetic.tasks, tmp_path / "out")),
              progress=events.append)
    stages = [e.stage for e in events]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["resolving", "preflight", "merging", "finalizing"]
    for stage in set(stages):
        mine = [e for e in events if e.stage == stage]
        assert all(e.total == mine[0].total for e in mine)
        assert [e.done for e in mine] == sorted(e.done for e in mine)  # monotone
        assert all(0 <= e.done <= e.total for e in mine)
        assert mine[-1].done == mine[-1].total  # every stage completes
    resolving = [e for e in events if e.stage == "resolving"]
    assert [e.current for e in resolving][:3] == [str(synthetic.base), *map(str, synthetic.tasks)]
    merging = [e for e in events if e.stage == "merging"]
    names = sorted(synthetic.base_tensors)
    assert merging[-1].total == len(names)
    assert [e.current for e in merging if e.current is not None] == names
    assert [e.done for e in merging] == list(range(len(names) + 1))


@pytest.mark.parametrize("cancel_at", [1, 2, 7])
def test_cancel_leaves_nothing(synthetic: Synthetic, tmp_path: Path, cancel_at: int) -> None:
    calls = 0

    def should_cancel() -> bool:
        nonlocal calls
        calls += 1
        return calls >= cancel_at

    out = tmp_path / "out"
    with pytest.raises(MergeCancelled):
        run_merge(spec_from_dict(job(synthetic.base, synthetic.tasks, out)),
                  should_cancel=should_cancel)
    assert calls == cancel_at  # it stops at the first true answer
    assert_nothing_written(out)


def test_cancel_during_finalizing_leaves_nothing(synthetic: Synthetic, tmp_path: Path) -> None:
    calls = 0
    n = len(synthetic.base_tensors)

    def should_cancel() -> bool:
        nonlocal calls
        calls += 1
        return calls > n  # after the last tensor

    out = tmp_path / "out"
    with pytest.raises(MergeCancelled):
        run_merge(spec_from_dict(job(synthetic.base, synthetic.tasks, out)),
                  should_cancel=should_cancel)
    assert_nothing_written(out)


def test_cancel_keeps_an_existing_destination(synthetic: Synthetic, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("previous run")
    with pytest.raises(MergeCancelled):
        run_merge(spec_from_dict(job(synthetic.base, synthetic.tasks, out)), overwrite=True,
                  should_cancel=lambda: True)
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert leftovers(out) == []


def preflight_messages(synthetic: Synthetic, destination: str, overwrite: bool = True
                       ) -> list[str]:
    with pytest.raises(PreflightError) as info:
        run_merge(spec_from_dict(job(synthetic.base, synthetic.tasks, destination)),
                  overwrite=overwrite)
    return [p.message for p in info.value.problems]


@pytest.mark.parametrize("destination", ["", "   "])
def test_an_empty_destination_is_a_problem_not_the_current_directory(
        synthetic: Synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        destination: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    messages = preflight_messages(synthetic, destination)
    assert any("output.destination is empty" in m for m in messages), messages
    assert [p.name for p in work.iterdir()] == ["precious.txt"]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("which", ["base", "task"])
def test_the_output_never_goes_into_an_input(synthetic: Synthetic, tmp_path: Path,
                                             which: str, overwrite: bool) -> None:
    """Written into the base, it would be copied into every later merge's output with the
    base's other files; into a task model, it would be read as part of that model."""
    source = synthetic.base if which == "base" else synthetic.tasks[1]
    destination = source / "merged"
    with pytest.raises(PreflightError) as info:
        prepare(spec_from_dict(job(synthetic.base, synthetic.tasks, destination)),
                overwrite=overwrite).close()
    assert [p.message for p in info.value.problems] == [
        f"the destination {destination} is inside the input {source}: write it beside the "
        "inputs"]
    assert info.value.problems[0].model == ("base" if which == "base" else "task2")
    assert not destination.exists()


def test_overwrite_never_deletes_an_input_or_the_current_directory(
        synthetic: Synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: sorted(q.name for q in p.iterdir()) for p in (synthetic.base, *synthetic.tasks)}
    # the base itself; a directory holding the task models
    assert any(f"--overwrite would delete {synthetic.base}" in m and "is it" in m
               for m in preflight_messages(synthetic, str(synthetic.base)))
    holder = synthetic.tasks[0].parent
    assert any("holds it" in m for m in preflight_messages(synthetic, str(holder)))
    work = tmp_path / "elsewhere" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    messages = preflight_messages(synthetic, str(work.parent))
    assert any(f"--overwrite would delete {work}" in m for m in messages), messages
    assert {p: sorted(q.name for q in p.iterdir()) for p in before} == before
    assert work.is_dir()


def test_fp8_checkpoints_are_refused(synthetic: Synthetic, tmp_path: Path) -> None:
    """Their weights need their block scales: merged as stored they would be wrong."""
    name = next(n for n, v in synthetic.base_tensors.items() if v.dim() == 2)
    fp8 = {**synthetic.task_tensors[1],
           name: synthetic.task_tensors[1][name].to(torch.float8_e4m3fn)}
    write_checkpoint(synthetic.tasks[1], fp8)
    messages = preflight_messages(synthetic, str(tmp_path / "out"), overwrite=False)
    assert any("FP8-quantized checkpoints cannot be merged" in m and "float8_e4m3fn" in m
               for m in messages), messages
    assert not (tmp_path / "out").exists()


def test_a_destination_whose_home_cannot_be_found_is_a_problem(synthetic: Synthetic) -> None:
    messages = preflight_messages(synthetic, "~no-such-user-4d1f/out", overwrite=False)
    assert any("cannot use the path '~no-such-user-4d1f/out'" in m for m in messages)


# --------------------------------------------------------------------------------------------
# selection, buffers, unchanged tensors


def test_exclude_keeps_tensors_bit_identical_to_the_base(synthetic: Synthetic,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = merge(synthetic, out, options={"exclude": [r"^layers\.1\.", "embed"]})
    merged = read_tensors(out)
    excluded = {n for n in synthetic.base_tensors if n.startswith("layers.1.") or "embed" in n}
    for name, value in merged.items():
        if name in excluded:
            assert torch.equal(value, synthetic.base_tensors[name]), name
        elif value.is_floating_point():
            torch.testing.assert_close(value, expected_ta(synthetic, name))
    assert excluded <= set(report["copied_tensors"])
    assert not excluded & set(report["tensors"])


def test_include_only(synthetic: Synthetic, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = merge(synthetic, out, options={"include": ["q_proj"], "exclude": [r"\.bias$"]})
    assert set(report["tensors"]) == {"layers.0.self_attn.q_proj.weight",
                                      "layers.1.self_attn.q_proj.weight"}
    merged = read_tensors(out)
    for name, value in merged.items():
        if name in report["tensors"]:
            torch.testing.assert_close(value, expected_ta(synthetic, name))
        else:
            assert torch.equal(value, synthetic.base_tensors[name]), name


def test_a_regex_that_selects_nothing_is_a_preflight_problem(synthetic: Synthetic,
                                                             tmp_path: Path) -> None:
    with pytest.raises(PreflightError) as info:
        merge(synthetic, tmp_path / "out", options={"include": ["no_such_tensor"]})
    assert [p.field for p in info.value.problems] == ["options.include"]


def test_integer_buffers_are_copied_from_the_base(synthetic: Synthetic, tmp_path: Path) -> None:
    # a task whose buffer differs (say, a resized position table) does not change the output
    task = dict(synthetic.task_tensors[0])
    task["position_ids"] = task["position_ids"].flip(-1).contiguous()
    write_checkpoint(synthetic.tasks[0], task)
    out = tmp_path / "out"
    report = merge(synthetic, out)
    merged = read_tensors(out)
    assert merged["position_ids"].dtype == torch.int64
    assert torch.equal(merged["position_ids"], synthetic.base_tensors["position_ids"])
    assert "position_ids" in report["copied_tensors"]
    assert "position_ids" not in report["tensors"]


def test_a_task_saved_without_an_integer_buffer_is_accepted(synthetic: Synthetic,
                                                            tmp_path: Path) -> None:
    """transformers >= 5 does not save non-persistent buffers; they come from the base."""
    task = {k: v for k, v in synthetic.task_tensors[0].items() if k != "position_ids"}
    (synthetic.tasks[0] / "model.safetensors").unlink()
    write_checkpoint(synthetic.tasks[0], task)
    out = tmp_path / "out"
    merge(synthetic, out)
    assert torch.equal(read_tensors(out)["position_ids"], synthetic.base_tensors["position_ids"])


def test_all_zero_deltas_are_unchanged_and_bit_identical(synthetic: Synthetic,
                                                         tmp_path: Path) -> None:
    untouched = [n for n in synthetic.base_tensors if n.startswith("layers.1.")]
    for path, tensors in zip(synthetic.tasks, synthetic.task_tensors, strict=True):
        write_checkpoint(path, {**tensors, **{n: synthetic.base_tensors[n] for n in untouched}})
    out = tmp_path / "out"
    report = merge(synthetic, out, method="ties")
    merged = read_tensors(out)
    for name in untouched:
        assert torch.equal(merged[name], synthetic.base_tensors[name]), name
        assert report["tensors"][name] == {"action": "unchanged"}
    assert report["summary"]["unchanged"] == len(untouched)
    assert report["summary"]["merged"] == sum(
        1 for n, v in synthetic.base_tensors.items()
        if v.is_floating_point() and n not in untouched)


@pytest.mark.parametrize(("method", "params"), [
    ("task_arithmetic", {"alpha": 0.7}), ("average", {}),
    ("dare_linear", {"density": 0.4, "alpha": 1.5})])
def test_sum_methods_stream_one_task_at_a_time_with_the_same_result(
        synthetic: Synthetic, tmp_path: Path, method: str, params: dict) -> None:
    """The engine streams task vectors through `SumOfTerms` methods; the result is the same,
    bit for bit, as the method's own `merge` on every task vector held at once."""
    untouched = [n for n in synthetic.base_tensors if n.startswith("layers.1.")]
    for path, tensors in zip(synthetic.tasks, synthetic.task_tensors, strict=True):
        write_checkpoint(path, {**tensors, **{n: synthetic.base_tensors[n] for n in untouched}})
    out = tmp_path / "out"
    models = [{"source": str(t), "weight": w} for t, w in zip(synthetic.tasks, (0.5, 2.0),
                                                               strict=True)]
    report = run_merge(spec_from_dict(job(synthetic.base, models, out, method=method,
                                          params=params,
                                          options={"compute_dtype": "float64"}))).report
    merged = read_tensors(out)
    instance = build_method(method, params)[0]
    assert isinstance(instance, SumOfTerms)
    for name, theta0 in synthetic.base_tensors.items():
        if not theta0.is_floating_point():
            continue
        if name in untouched:
            assert report["tensors"][name] == {"action": "unchanged"}
            assert torch.equal(merged[name], theta0)
            continue
        task = TensorTask(name=name, weights=[0.5, 2.0], task_names=["task1", "task2"],
                          task_vectors=[t[name].double() - theta0.double()
                                        for t in synthetic.task_tensors])
        delta = instance.merge(task).delta
        assert delta is not None
        assert torch.equal(merged[name], (theta0.double() + delta).to(theta0.dtype)), name
        assert report["tensors"][name] == {"action": "merged", **task.diagnostics}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_reading_ahead_changes_no_byte(synthetic: Synthetic, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """The next tensor is read in a thread while the current one merges (inputs up to
    READ_AHEAD_BYTES) or only advised to the kernel: the output is the same either way, and
    every tensor read ahead is taken by the loop (none left holding memory)."""
    calls: list[str] = []
    read_ahead = Checkpoint.read_ahead

    def counted(self: Checkpoint, name: str, executor: Executor) -> None:
        calls.append(name)
        read_ahead(self, name, executor)

    monkeypatch.setattr(Checkpoint, "read_ahead", counted)
    outputs = []
    for limit in (0, 2**40):
        monkeypatch.setattr(engine, "READ_AHEAD_BYTES", limit)
        calls.clear()
        out = tmp_path / f"out-{limit}"
        prepared = prepare(spec_from_dict(job(synthetic.base, synthetic.tasks, out,
                                              method=method)))
        try:
            execute(prepared)
            for checkpoint in (prepared.base, *(t.model for t in prepared.inputs)):
                assert isinstance(checkpoint, Checkpoint) and not checkpoint._ahead
        finally:
            prepared.close()
        # every tensor but the first is read ahead: merged ones from the base and both tasks,
        # integer buffers (copied) from the base
        ahead = [3 if synthetic.base_tensors[n].is_floating_point() else 1
                 for n in sorted(synthetic.base_tensors)[1:]]
        assert len(calls) == (0 if limit == 0 else sum(ahead))
        outputs.append({f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))})
    assert outputs[0] and outputs[0] == outputs[1]


# --------------------------------------------------------------------------------------------
# dtypes


def test_output_dtype_defaults_to_the_base_dtype(synthetic: Synthetic, tmp_path: Path) -> None:
    out = tmp_path / "f32"
    report = merge(synthetic, out)
    assert report["output"]["dtype"] == "float32"
    assert {v.dtype for v in read_tensors(out).values()} == {torch.float32, torch.int64}
    # a bfloat16 base gives a bfloat16 model
    for path, tensors in [(synthetic.base, synthetic.base_tensors),
                          *zip(synthetic.tasks, synthetic.task_tensors, strict=True)]:
        write_checkpoint(path, {k: v.bfloat16() if v.is_floating_point() else v
                                for k, v in tensors.items()})
    out = tmp_path / "bf16"
    report = merge(synthetic, out)
    assert report["output"]["dtype"] == "bfloat16"
    assert {v.dtype for v in read_tensors(out).values()} == {torch.bfloat16, torch.int64}


def test_without_output_dtype_each_tensor_keeps_its_base_dtype(synthetic: Synthetic,
                                                               tmp_path: Path) -> None:
    """A bfloat16 checkpoint that keeps some tensors in float32 on purpose (norms, a scale):
    merged, excluded or unchanged, each is written in its own dtype, not the most common one."""
    kept = sorted(n for n, v in synthetic.base_tensors.items()
                  if v.is_floating_point() and v.dim() == 1)[:2]
    assert len(kept) == 2
    for path, tensors in [(synthetic.base, synthetic.base_tensors),
                          *zip(synthetic.tasks, synthetic.task_tensors, strict=True)]:
        write_checkpoint(path, {k: v.bfloat16() if v.is_floating_point() and k not in kept
                                else v for k, v in tensors.items()})
    out = tmp_path / "mixed"
    report = merge(synthetic, out, options={"exclude": [f"^{re.escape(kept[1])}$"]})
    assert report["output"]["dtype"] == "as in the base, per tensor (bfloat16, float32)"
    written = read_tensors(out)
    for name, value in written.items():
        base = synthetic.base_tensors[name]
        expected = base.dtype if name in kept or not base.is_floating_point() \
            else torch.bfloat16
        assert value.dtype == expected, name
    assert torch.equal(written[kept[1]], synthetic.base_tensors[kept[1]])  # excluded: as is


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bfloat16", torch.bfloat16),
                                                    ("float16", torch.float16)])
def test_explicit_output_dtype(synthetic: Synthetic, tmp_path: Path, dtype: str,
                               torch_dtype: torch.dtype) -> None:
    reference = tmp_path / "f32"
    merge(synthetic, reference)
    out = tmp_path / dtype
    report = merge(synthetic, out, output={"dtype": dtype})
    assert report["output"]["dtype"] == dtype
    full = read_tensors(reference)
    for name, value in read_tensors(out).items():
        if full[name].is_floating_point():
            assert value.dtype == torch_dtype
            # computed in float32, rounded once at the end
            assert torch.equal(value, full[name].to(torch_dtype)), name
        else:
            assert torch.equal(value, full[name])


def test_compute_dtype_float64_rounds_once(tmp_path: Path) -> None:
    """float64 arithmetic: the output is the float64 result rounded to float32 (within half an
    ulp); float32 arithmetic accumulates several roundings and is off more often."""
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=gen) + 3}
    tasks = [{"w": base["w"] + torch.randn(64, 64, generator=gen) * s} for s in (1.0, 0.3, 2.0)]
    base_dir = write_checkpoint(tmp_path / "base", base)
    dirs = [write_checkpoint(tmp_path / f"t{i}", t) for i, t in enumerate(tasks)]
    weights = (0.7, -1.3, 0.45)
    models = [{"source": str(d), "weight": w} for d, w in zip(dirs, weights, strict=True)]
    t0 = base["w"].double()
    exact = t0 + 0.37 * sum(w * (t["w"].double() - t0)
                            for w, t in zip(weights, tasks, strict=True))
    rounded = exact.float()
    half_ulp = 0.5 * (torch.nextafter(rounded, torch.tensor(float("inf"))) - rounded).double()

    errors = {}
    for compute in ("float32", "float64"):
        out = tmp_path / compute
        report = run_merge(spec_from_dict(job(base_dir, models, out, params={"alpha": 0.37},
                                              options={"compute_dtype": compute}))).report
        assert report["compute_dtype"] == compute
        value = read_tensors(out)["w"]
        assert value.dtype == torch.float32
        errors[compute] = (value.double() - exact).abs()
    assert bool((errors["float64"] <= half_ulp * (1 + 1e-9)).all())
    assert int((errors["float32"] > half_ulp * (1 + 1e-9)).sum()) > 0


# --------------------------------------------------------------------------------------------
# what an output directory holds


def test_output_files(synthetic: Synthetic, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_merge(spec_from_dict(job(synthetic.base, synthetic.tasks, out)))
    assert result.destination == out.resolve()
    on_disk = sorted(p.name for p in out.iterdir())
    assert on_disk == sorted(result.files)
    assert set(on_disk) == {"model.safetensors", "config.json", "merge_spec.yaml",
                            "merge_report.json", "README.md"}
    assert json.loads((out / "config.json").read_text()) == {"model_type": "synthetic"}
    assert leftovers(out) == []


def test_merge_spec_is_a_pinned_spec_that_reproduces_the_merge(
        synthetic: Synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative sources, as a user would write them
    spec = job("./base", ["./task1", {"source": "./task2", "weight": 0.5, "name": "second"}],
               "./out", method="ties", params={"density": 0.5}, options={"seed": 3})
    result = run_merge(spec_from_dict(spec))
    saved = load_spec(tmp_path / "out" / "merge_spec.yaml")
    assert saved == result.spec
    assert saved.base == str(synthetic.base.resolve())
    assert [m.source for m in saved.models] == [str(p.resolve()) for p in synthetic.tasks]
    assert [m.name for m in saved.models] == ["task1", "second"]
    assert [m.weight for m in saved.models] == [1.0, 0.5]
    # every parameter written out, the defaults too
    assert saved.method.name == "ties" and saved.method.params == {"density": 0.5, "alpha": 1.0}
    assert saved.options.seed == 3
    # from anywhere, the saved spec makes the same model
    monkeypatch.chdir(synthetic.base)
    again = saved.model_copy(update={"output": saved.output.model_copy(
        update={"destination": str(tmp_path / "again")})})
    run_merge(again)
    first, second = read_tensors(tmp_path / "out"), read_tensors(tmp_path / "again")
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_merge_report(synthetic: Synthetic, tmp_path: Path) -> None:
    out = tmp_path / "out"
    models = [{"source": str(synthetic.tasks[0]), "name": "one", "weight": 2.0},
              {"source": str(synthetic.tasks[1])}]
    result = run_merge(spec_from_dict(job(synthetic.base, models, out, method="ties")))
    report = json.loads((out / "merge_report.json").read_text())
    assert report == result.report
    assert report["merge_service_version"] == __version__
    defaults = available()["ties"].Params().model_dump(mode="json")
    assert report["method"] == {"name": "ties", "params": defaults}
    assert report["method"]["params"]["density"] == 0.2
    assert report["space"] == "full"
    assert report["base"]["source"] == str(synthetic.base.resolve())
    assert [(m["name"], m["weight"], m["kind"]) for m in report["models"]] == \
        [("one", 2.0, "full"), ("task2", 1.0, "full")]
    assert report["device"] in {"cpu", "cuda", "cuda:0"}
    assert report["compute_dtype"] == "float32"
    tensors = read_tensors(out)
    assert report["output"]["format"] == "full"
    assert report["output"]["bytes"] == sum(v.numel() * v.element_size()
                                            for v in tensors.values())
    floats = {n for n, v in synthetic.base_tensors.items() if v.is_floating_point()}
    assert set(report["tensors"]) == floats
    assert all(t["action"] == "merged" for t in report["tensors"].values())
    assert report["copied_tensors"] == ["position_ids"]
    assert report["summary"] == {"merged": len(floats), "unchanged": 0, "copied": 1}
    timings = report["timings_s"]
    assert {"resolve_s", "preflight_s", "merge_s", "finalize_s", "total_s"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    assert timings["total_s"] >= timings["merge_s"]
    assert report["peak_memory"]["process_peak_rss_bytes"] > 10 * 2**20


def test_model_card_front_matter(synthetic: Synthetic, tmp_path: Path) -> None:
    out = tmp_path / "out"
    models = [{"source": str(synthetic.tasks[0]), "name": "alpha-task", "weight": 0.5},
              {"source": str(synthetic.tasks[1])}]
    run_merge(spec_from_dict(job(synthetic.base, models, out, name="my merge")))
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    # a local base whose config names no Hub model: no base_model (the Hub refuses a path
    # there); the text names the directory
    assert "base_model" not in front and str(synthetic.base.resolve()) in text
    assert front["base_model_relation"] == "merge" and front["library_name"] == "transformers"
    assert "task_arithmetic" in front["tags"]
    body = text.split("---\n", 2)[2]
    assert "# my merge" in body
    assert "alpha-task" in body and str(synthetic.tasks[0].resolve()) in body
    assert "alpha: 0.3" in body  # the method's parameters, defaults included

    # a local copy of a Hub model (save_pretrained writes its id as _name_or_path)
    config = json.loads((synthetic.base / "config.json").read_text()) \
        if (synthetic.base / "config.json").is_file() else {}
    (synthetic.base / "config.json").write_text(json.dumps(
        {**config, "_name_or_path": "org/base-model"}))
    run_merge(spec_from_dict(job(synthetic.base, models, tmp_path / "named")))
    front = yaml.safe_load((tmp_path / "named" / "README.md").read_text().split("---\n")[1])
    assert front["base_model"] == "org/base-model"


def test_shard_size_is_honoured_and_transformers_loads_the_shards(
        tiny_bert_dir: Path, tmp_path: Path, hf_offline: None) -> None:
    from transformers import AutoModel

    base = read_tensors(tiny_bert_dir)
    tasks = [write_checkpoint(tmp_path / f"ft{s}", perturbed(base, s, scale=0.05),
                              copy_from=tiny_bert_dir) for s in (1, 2)]
    out = tmp_path / "out"
    result = run_merge(spec_from_dict(job(tiny_bert_dir, tasks, out, method="average",
                                          output={"shard_size": "20KB"})))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4
    assert sorted(p.name for p in out.glob("model*.safetensors")) == shards
    assert set(result.files) >= {*shards, "model.safetensors.index.json"}
    merged = read_tensors(out)
    assert set(index["weight_map"]) == set(base) == set(merged)
    for shard in shards:
        names = [n for n, f in index["weight_map"].items() if f == shard]
        size = sum(merged[n].numel() * merged[n].element_size() for n in names)
        assert size <= 20_000 or len(names) == 1
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size()
                                                  for v in merged.values())
    model = AutoModel.from_pretrained(out)
    state = model.state_dict()
    for name, value in merged.items():
        assert torch.equal(state[name], value), name
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([[1, 5, 9, 2]])).last_hidden_state
    assert hidden.shape == (1, 4, 32) and torch.isfinite(hidden).all()


# --------------------------------------------------------------------------------------------
# failures mid-merge


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_corrupt_late_tensor_leaves_nothing(synthetic: Synthetic, tmp_path: Path,
                                              bad: float) -> None:
    late = sorted(n for n, v in synthetic.base_tensors.items() if v.is_floating_point())[-1]
    tensors = dict(synthetic.task_tensors[1])
    tensors[late] = tensors[late].clone()
    tensors[late].view(-1)[3] = bad
    write_checkpoint(synthetic.tasks[1], tensors)
    prepare(spec_from_dict(job(synthetic.base, synthetic.tasks, tmp_path / "x"))).close()
    events: list[Progress] = []
    out = tmp_path / "out"
    with pytest.raises(CorruptTensorError) as info:
        run_merge(spec_from_dict(job(synthetic.base, synthetic.tasks, out)),
                  progress=events.append)
    [problem] = info.value.problems
    assert (problem.model, problem.tensor) == ("task2", late)
    assert "NaN or Inf" in problem.message
    assert any(e.stage == "merging" and e.current == late for e in events)  # it got that far
    assert_nothing_written(out)


def test_a_failure_keeps_the_previous_output(synthetic: Synthetic, tmp_path: Path) -> None:
    out = tmp_path / "out"
    merge(synthetic, out)
    before = read_tensors(out)
    tensors = dict(synthetic.task_tensors[0])
    tensors["norm.weight"] = torch.full_like(tensors["norm.weight"], float("nan"))
    write_checkpoint(synthetic.tasks[0], tensors)
    with pytest.raises(CorruptTensorError):
        run_merge(spec_from_dict(job(synthetic.base, synthetic.tasks, out)), overwrite=True)
    after = read_tensors(out)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert leftovers(out) == []


def test_preflight_reads_no_tensor_data(synthetic: Synthetic, tmp_path: Path) -> None:
    """Preflight works from headers: a task whose data is all NaN passes it."""
    tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in synthetic.task_tensors[0].items()}
    write_checkpoint(synthetic.tasks[0], tensors)
    prepared = prepare(spec_from_dict(job(synthetic.base, synthetic.tasks, tmp_path / "out")))
    try:
        assert len(prepared.merged) == sum(1 for v in synthetic.base_tensors.values()
                                           if v.is_floating_point())
        assert prepared.copied == ["position_ids"]
    finally:
        prepared.close()
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(synthetic: Synthetic, tmp_path: Path) -> None:
    with pytest.raises(PreflightError) as info:
        merge(synthetic, tmp_path / "out", options={"device": "cuda"})
    assert [p.field for p in info.value.problems] == ["options.device"]
