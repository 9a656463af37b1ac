"""`merge-service`: exit codes, messages that name what is wrong, and nothing written on error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_service.cli import main
from merge_service.methods import available
from tests.conftest import (
    Synthetic,
    assert_nothing_written,
    build_adapter,
    job,
    leftovers,
    offline,
    perturbed,
    read_tensors,
    write_checkpoint,
    write_spec,
)

CLI = Path(sys.executable).parent / "merge-service"


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_adapters(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> list[Path]:
    """Two LoRA adapters of the tiny BERT (copy them before changing them)."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("cli_adapters")
    with offline():
        return [build_adapter(AutoModel.from_pretrained(tiny_bert_dir), root / f"lora{i}", i,
                              r=4, lora_alpha=8, target_modules=["query", "value"])
                for i in range(2)]


@pytest.fixture
def gpt2_adapter(tiny_gpt2_dir: Path, tmp_path: Path) -> Path:
    """An adapter of another model (GPT-2): its base name and its targets do not fit BERT."""
    from transformers import AutoModel

    with offline():
        return build_adapter(AutoModel.from_pretrained(tiny_gpt2_dir), tmp_path / "gpt2-lora",
                             0, r=2, lora_alpha=2, target_modules=["c_attn"],
                             fan_in_fan_out=True)


# --------------------------------------------------------------------------------------------
# bad input: exit 1, a message naming the model / tensor / expected value, nothing written

Case = Callable[[Synthetic, Path], dict]


def _missing_source(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, [syn.tasks[0], tmp / "no-such-model"], tmp / "out")


def _garbage_weights(syn: Synthetic, tmp: Path) -> dict:
    (syn.tasks[1] / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    return job(syn.base, syn.tasks, tmp / "out")


def _truncated(syn: Synthetic, tmp: Path) -> dict:
    path = syn.tasks[1] / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return job(syn.base, syn.tasks, tmp / "out")


def _rewrite_task(syn: Synthetic, change: Callable[[dict], None]) -> None:
    tensors = dict(syn.task_tensors[1])
    change(tensors)
    (syn.tasks[1] / "model.safetensors").unlink()
    write_checkpoint(syn.tasks[1], tensors)


def _shape_mismatch(syn: Synthetic, tmp: Path) -> dict:
    _rewrite_task(syn, lambda t: t.update({"layers.1.mlp.up_proj.weight": torch.zeros(15, 8)}))
    return job(syn.base, syn.tasks, tmp / "out")


def _missing_tensor(syn: Synthetic, tmp: Path) -> dict:
    _rewrite_task(syn, lambda t: t.pop("layers.0.self_attn.v_proj.weight"))
    return job(syn.base, syn.tasks, tmp / "out")


def _extra_tensor(syn: Synthetic, tmp: Path) -> dict:
    _rewrite_task(syn, lambda t: t.update({"lm_head.weight": torch.zeros(20, 8)}))
    return job(syn.base, syn.tasks, tmp / "out")


def _nan(syn: Synthetic, tmp: Path) -> dict:
    def poison(t: dict) -> None:
        t["layers.1.self_attn.q_proj.weight"] = t["layers.1.self_attn.q_proj.weight"].clone()
        t["layers.1.self_attn.q_proj.weight"][2, 3] = float("nan")
    _rewrite_task(syn, poison)
    return job(syn.base, syn.tasks, tmp / "out")


def _inf(syn: Synthetic, tmp: Path) -> dict:
    _rewrite_task(syn, lambda t: t.update({"norm.weight": torch.full((8,), float("inf"))}))
    return job(syn.base, syn.tasks, tmp / "out")


def _one_model(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, syn.tasks[:1], tmp / "out")


def _unknown_method(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, syn.tasks, tmp / "out", method="magic_merge")


def _unknown_param(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, syn.tasks, tmp / "out", method="ties", params={"densty": 0.3})


def _bad_param_value(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, syn.tasks, tmp / "out", method="ties", params={"density": "high"})


def _lora_format_for_full(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, syn.tasks, tmp / "out", output={"format": "lora"})


def _compressed_with_ta(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, syn.tasks, tmp / "out", output={"format": "compressed"})


def _nan_param(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, syn.tasks, tmp / "out", params={"alpha": float("nan")})


def _overflowing_weight(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, [{"source": str(syn.tasks[0]), "weight": 1e300}, syn.tasks[1]],
               tmp / "out")


def _overflowing_float16(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, [{"source": str(syn.tasks[0]), "weight": 1e7}, syn.tasks[1]],
               tmp / "out", params={"alpha": 1.0}, output={"dtype": "float16"})


def _long_destination(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, syn.tasks, tmp / ("x" * 300))


def _long_source(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, [syn.tasks[0], "y" * 300], tmp / "out")


def _nul_in_a_path(syn: Synthetic, tmp: Path) -> dict:
    return job(f"{syn.base}\0", syn.tasks, f"{tmp / 'out'}\0")


def _device_index_too_large(syn: Synthetic, tmp: Path) -> dict:
    return job(syn.base, syn.tasks, tmp / "out", options={"device": "cuda:" + "9" * 24})


def _unknown_field(syn: Synthetic, tmp: Path) -> dict:
    return {**job(syn.base, syn.tasks, tmp / "out"), "optoins": {"seed": 1}}


def _adapter_as_base(syn: Synthetic, tmp: Path) -> dict:
    (tmp / "fake-adapter").mkdir()
    (tmp / "fake-adapter" / "adapter_config.json").write_text("{}")
    return job(tmp / "fake-adapter", syn.tasks, tmp / "out")


BAD_INPUTS: dict[str, tuple[Case, list[str]]] = {
    "missing source dir": (_missing_source, ["no-such-model", "does not exist"]),
    "garbage safetensors": (_garbage_weights, ["task2", "model.safetensors",
                                               "header length is beyond the end"]),
    "truncated safetensors": (_truncated, ["task2", "model.safetensors", "truncated"]),
    "shape mismatch": (_shape_mismatch, ["task2", "layers.1.mlp.up_proj.weight",
                                         "shape [15, 8], expected [16, 8]"]),
    "missing tensor": (_missing_tensor, ["task2", "layers.0.self_attn.v_proj.weight",
                                         "missing (present in the base)"]),
    "extra tensor": (_extra_tensor, ["task2", "lm_head.weight", "not in the base model"]),
    "NaN in a task tensor": (_nan, ["task2", "layers.1.self_attn.q_proj.weight",
                                    "NaN or Inf"]),
    "Inf in a task tensor": (_inf, ["task2", "norm.weight", "NaN or Inf"]),
    "fewer than 2 models": (_one_model, ["models", "at least 2 models"]),
    "unknown method": (_unknown_method, ["method.name", "unknown method 'magic_merge'",
                                         "task_arithmetic"]),
    "unknown parameter": (_unknown_param, ["method.params.densty", "unknown parameter"]),
    "bad parameter value": (_bad_param_value, ["method.params.density", "ties"]),
    "NaN parameter": (_nan_param, ["method.params.alpha", "finite number"]),
    "a weight that overflows": (_overflowing_weight, [
        "the merged value overflows to Inf or NaN in float32", "too large?"]),
    "an output dtype that overflows": (_overflowing_float16, ["overflows", "in float16"]),
    "format lora for full checkpoints": (_lora_format_for_full, [
        "output.format", "'lora' needs LoRA adapters"]),
    "compressed with task_arithmetic": (_compressed_with_ta, [
        "output.format", "cannot produce format 'compressed'"]),
    "unknown spec field": (_unknown_field, ["optoins", "unknown field"]),
    "destination name too long": (_long_destination, ["output.destination: cannot use "
                                                      "destination", "File name too long"]),
    "source name too long": (_long_source, ["cannot use the local source 'yyy",
                                            "File name too long"]),
    "NUL in a path": (_nul_in_a_path, ["base: contains a NUL character",
                                       "output.destination: contains a NUL character"]),
    "device index too large": (_device_index_too_large, [
        "options.device: cuda:999999999999999999999999 is not a device torch knows"]),
    "adapter as the base": (_adapter_as_base, ["base", "not a LoRA adapter"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_1_with_a_clear_message_and_writes_nothing(
        synthetic: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        case: str) -> None:
    build, expected = BAD_INPUTS[case]
    spec = write_spec(tmp_path, **build(synthetic, tmp_path))
    code, out, err = run(capsys, "merge", spec)
    assert code == 1, err
    assert err.startswith("error: ")
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert "Traceback" not in err + out
    assert_nothing_written(tmp_path / "out")


def test_corrupt_adapter_config(synthetic: Synthetic, tiny_bert_dir: Path,
                                tiny_adapters: list[Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    broken = shutil.copytree(tiny_adapters[1], tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{'r': 8,")  # not JSON
    spec = write_spec(tmp_path, **job(tiny_bert_dir, [tiny_adapters[0], broken], tmp_path / "out",
                                      space="full"))
    code, _, err = run(capsys, "merge", spec)
    assert code == 1
    assert "broken" in err and "adapter_config.json is not valid JSON" in err
    assert_nothing_written(tmp_path / "out")


def test_adapter_for_another_base(tiny_bert_dir: Path, tiny_adapters: list[Path],
                                  gpt2_adapter: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, **job(tiny_bert_dir, [tiny_adapters[0], gpt2_adapter],
                                      tmp_path / "out", space="full"))
    code, _, err = run(capsys, "merge", spec)
    assert code == 1
    assert "gpt2-lora" in err
    assert "adapter was trained on" in err and "tiny-gpt2" in err and "tiny-bert" in err
    assert "h.0.attn.c_attn" in err and "has no weight in the base" in err
    assert_nothing_written(tmp_path / "out")


def test_full_checkpoints_mixed_with_adapters(tiny_bert_dir: Path, tiny_adapters: list[Path],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    finetune = write_checkpoint(tmp_path / "finetune",
                                perturbed(read_tensors(tiny_bert_dir), 1))
    spec = write_spec(tmp_path, **job(tiny_bert_dir, [tiny_adapters[0], finetune],
                                      tmp_path / "out", space="full"))
    code, _, err = run(capsys, "merge", spec)
    assert code == 1
    assert "all full checkpoints or all LoRA adapters" in err
    assert "lora0 (LoRA adapter)" in err and "finetune (full checkpoint)" in err
    assert_nothing_written(tmp_path / "out")


def test_lora_adapters_merge_through_the_cli(tiny_bert_dir: Path, tiny_adapters: list[Path],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, **job(tiny_bert_dir, tiny_adapters, tmp_path / "out",
                                      space="full"))
    code, out, err = run(capsys, "merge", spec, "-q")
    assert code == 0, err
    assert "merged 2 models with task_arithmetic (full space)" in out
    merged = read_tensors(tmp_path / "out")
    base = read_tensors(tiny_bert_dir)
    changed = {n for n in base if not torch.equal(merged[n], base[n])}
    assert changed == {f"encoder.layer.{i}.attention.self.{m}.weight" for i in range(2)
                       for m in ("query", "value")}


def test_a_bad_setting_is_invalid_input_named_by_its_variable(
        synthetic: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGE_SERVICE_MAX_JOB_SECONDS", "5")
    spec = write_spec(tmp_path, **job(synthetic.base, synthetic.tasks, tmp_path / "out"))
    code, _, err = run(capsys, "validate", spec)
    assert code == 1
    assert err.strip() == ("error: MERGE_SERVICE_MAX_JOB_SECONDS: Input should be greater "
                           "than or equal to 60")


def test_existing_destination_needs_overwrite(synthetic: Synthetic, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-model.safetensors").write_text("previous output")
    spec = write_spec(tmp_path, **job(synthetic.base, synthetic.tasks, out))
    code, _, err = run(capsys, "merge", spec)
    assert code == 1
    assert "already exists" in err and "--overwrite" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["old-model.safetensors"]

    code, stdout, err = run(capsys, "merge", spec, "--overwrite")
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert "old-model.safetensors" not in names
    assert {"model.safetensors", "merge_report.json", "merge_spec.yaml", "README.md"} <= names
    assert str(out) in stdout


def test_merge_prints_a_summary_and_out_overrides_the_destination(
        synthetic: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, **job(synthetic.base, synthetic.tasks, tmp_path / "ignored"))
    code, out, err = run(capsys, "merge", spec, "--out", tmp_path / "chosen")
    assert code == 0, err
    assert not (tmp_path / "ignored").exists()
    merged = read_tensors(tmp_path / "chosen")
    floats = sum(1 for v in synthetic.base_tensors.values() if v.is_floating_point())
    assert f"tensors: {floats} merged, 0 unchanged, 1 copied from the base" in out
    assert "output: full, float32" in out
    assert set(merged) == set(synthetic.base_tensors)


def test_validate_lists_every_problem_at_once(synthetic: Synthetic, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _rewrite_task(synthetic, lambda t: t.update({"layers.1.mlp.up_proj.weight":
                                                 torch.zeros(15, 8)}))
    (tmp_path / "out").mkdir()
    spec = job(synthetic.base, [*synthetic.tasks, tmp_path / "absent"], tmp_path / "out",
               method="ties", params={"densty": 0.3}, options={"exclude": ["nothing_named"]})
    code, out, err = run(capsys, "validate", write_spec(tmp_path, **spec))
    assert code == 1
    assert err.startswith("error: 5 problems:")
    for fragment in ("method.params.densty: unknown parameter",
                     "output.destination: destination", "already exists",
                     "absent", "does not exist",
                     "task2 / layers.1.mlp.up_proj.weight: shape [15, 8], expected [16, 8]",
                     "options.exclude: regex 'nothing_named' matches no tensor"):
        assert fragment in err, fragment
    assert out == ""


def test_what_preflight_says_of_a_default_standing_in_is_not_reported(
        synthetic: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A problem preflight reports at one field but owes to the default of another that was
    invalid is not the user's: target_rank against format 'full' where the format was
    mistyped, a sum of the weights of 0 where a weight was not a number."""
    spec = job(synthetic.base, synthetic.tasks, tmp_path / "out", method="average",
               params={"target_rank": 4})
    spec["output"]["format"] = "loar"
    code, _, err = run(capsys, "validate", write_spec(tmp_path, **spec))
    assert code == 1 and err.startswith("error: output.format: Input should be"), err
    assert "target_rank" not in err
    spec = job(synthetic.base, [{"source": str(synthetic.tasks[0]), "weight": "heavy"},
                                {"source": str(synthetic.tasks[1]), "weight": -1}],
               tmp_path / "out", method="average")
    code, _, err = run(capsys, "validate", write_spec(tmp_path, **spec))
    assert code == 1 and err.startswith("error: models.0.weight: Input should be"), err
    assert "sum of the weights" not in err
    # a value of no member of a union (shard_size: str | int) hides nothing either
    spec = job(synthetic.base, synthetic.tasks, tmp_path / "out", method="average",
               options={"exclude": ["nothing_named"]})
    spec["output"]["shard_size"] = 1.5
    code, _, err = run(capsys, "validate", write_spec(tmp_path, **spec))
    assert code == 1 and "options.exclude: regex 'nothing_named' matches no tensor" in err, err


def test_a_typo_in_the_spec_does_not_hide_the_other_problems(
        synthetic: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = job(synthetic.base, [synthetic.tasks[0], tmp_path / "absent"], tmp_path / "out",
               method="ties", params={"alpah": 0.3})
    spec["models"][0]["wieght"] = 2
    spec["output"]["dtype"] = "float99"  # an invalid value hides nothing either
    code, out, err = run(capsys, "validate", write_spec(tmp_path, **spec))
    assert code == 1
    assert err.startswith("error: 4 problems:") and out == ""
    for fragment in ("models.0.wieght: unknown field", "method.params.alpah: unknown parameter",
                     "output.dtype: Input should be", "absent", "does not exist"):
        assert fragment in err, fragment
    code, _, merge_err = run(capsys, "merge", write_spec(tmp_path, **spec))
    assert (code, merge_err) == (1, err)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("args", [[], ["bogus"], ["merge"], ["revert", "art", "--task", "a"],
                                  ["methods", "--colour"]])
def test_usage_errors_are_invalid_input(args: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("usage: merge-service") and "error: " in err


def test_every_command_and_option_is_described_in_its_help() -> None:
    import argparse

    from merge_service.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    described = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(described) == set(commands.choices) and all(described.values()), described
    # DESIGN.md section 3: `up` is the whole service
    assert all(part in described["up"] for part in ("Redis", "API", "worker", "scheduler"))
    for name, command in commands.choices.items():
        undocumented = [a.option_strings or a.dest for a in command._actions
                        if a.help is None and not isinstance(a, argparse._HelpAction)]
        assert undocumented == [], f"merge-service {name}: {undocumented}"


def test_validate_ok(synthetic: Synthetic, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, **job(synthetic.base, synthetic.tasks, tmp_path / "out",
                                      options={"exclude": ["embed"]}))
    code, out, err = run(capsys, "validate", spec)
    assert code == 0, err
    floats = sum(1 for v in synthetic.base_tensors.values() if v.is_floating_point())
    assert out.startswith("ok: 2 models, method task_arithmetic")
    assert f"{floats - 1} tensors to merge, 2 copied from the base" in out
    assert not (tmp_path / "out").exists()


def test_spec_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "merge", tmp_path / "absent.yaml")
    assert code == 1 and "spec file not found" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    code, _, err = run(capsys, "validate", bad)
    assert code == 1 and "not valid JSON" in err


def test_a_real_process_exits_1_without_a_traceback(synthetic: Synthetic, tmp_path: Path) -> None:
    _rewrite_task(synthetic, lambda t: t.update({"layers.1.mlp.up_proj.weight":
                                                 torch.zeros(15, 8)}))
    spec = write_spec(tmp_path, **job(synthetic.base, synthetic.tasks, tmp_path / "out"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MERGE_SERVICE_DEBUG", None)
    proc = subprocess.run([str(CLI), "merge", str(spec)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "task2 / layers.1.mlp.up_proj.weight: shape [15, 8], expected [16, 8]" in proc.stderr
    assert_nothing_written(tmp_path / "out")


def test_a_real_process_merges(synthetic: Synthetic, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "spec.json", **job(synthetic.base, synthetic.tasks,
                                                   tmp_path / "out", method="average"))
    proc = subprocess.run([str(CLI), "merge", str(spec)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    merged = load_file(tmp_path / "out" / "model.safetensors")
    name = "layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], (synthetic.task_tensors[0][name]
                                              + synthetic.task_tensors[1][name]) / 2)


# --------------------------------------------------------------------------------------------
# methods


def test_methods_lists_every_method_with_params_and_defaults(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "methods")
    assert code == 0
    for name, cls in available().items():
        assert f"{name}  [" in out
        assert cls.summary in out
        weights = "" if cls.uses_weights else "; no per-model weights"
        assert f"    LoRA spaces: {', '.join(sorted(cls.spaces))}{weights}\n" in out
        defaults = cls.Params().model_dump(mode="json")
        for param, default in defaults.items():
            if param != "svd_exclude":  # a list default (from a factory) is printed as None
                assert f"    {param} = {default!r}" in out, (name, param)


def test_methods_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0
    entries = json.loads(out)
    assert [e["name"] for e in entries] == list(available())
    for entry in entries:
        cls = available()[entry["name"]]
        assert sorted(entry["output_formats"]) == sorted(cls.output_formats)
        assert entry["spaces"] == sorted(cls.spaces) and entry["weights"] is cls.uses_weights
        defaults = cls.Params().model_dump(mode="json")
        assert set(entry["params"]) == set(defaults)
        for param, info in entry["params"].items():
            if info["default"] is not None or defaults[param] is None:
                assert info["default"] == defaults[param], (entry["name"], param)
    ta = next(e for e in entries if e["name"] == "task_arithmetic")
    assert ta["params"]["alpha"]["default"] == 0.3


@pytest.mark.parametrize("args", [["methods"], ["methods", "--json"]])
def test_a_reader_that_went_away_is_not_an_error(args: list[str]) -> None:
    """`merge-service methods | head -1`: no traceback, no `failed:`, exit 0."""
    read, write = os.pipe()
    os.close(read)  # gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "merge_service.cli", *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_broken_pipe_elsewhere_is_a_failure(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Only stdout's reader going away is quiet: a BrokenPipeError from anything else (a
    pipe to another process, a socket) is reported and exits 2."""
    import merge_service.cli as cli_module

    def broken(_: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli_module, "cmd_methods", broken)
    code, _, err = run(capsys, "methods")
    assert code == 2 and "failed: BrokenPipeError: [Errno 32] Broken pipe" in err


# --------------------------------------------------------------------------------------------
# revert


@pytest.fixture
def compressed_artifact(synthetic: Synthetic, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> Path:
    if "tsv_compress" not in available():
        pytest.skip("tsv_compress is not registered")
    models = [{"source": str(p), "name": n} for p, n in zip(synthetic.tasks, ("math", "code"),
                                                              strict=True)]
    spec = write_spec(tmp_path, "artifact.yaml", **job(
        synthetic.base, models, tmp_path / "artifact", method="tsv_compress",
        params={"rank_fraction": 1.0}, output={"format": "compressed"}))
    code, _, err = run(capsys, "merge", spec)
    assert code == 0, err
    return tmp_path / "artifact"


def test_revert_unknown_task(compressed_artifact: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "revert", compressed_artifact, "--task", "poetry",
                       "--out", tmp_path / "recovered")
    assert code == 1
    assert "no task 'poetry'" in err and "math" in err and "code" in err
    assert "Traceback" not in err
    assert_nothing_written(tmp_path / "recovered")


def test_revert_a_known_task(compressed_artifact: Path, synthetic: Synthetic, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "revert", compressed_artifact, "--task", "code",
                         "--out", tmp_path / "recovered")
    assert code == 0, err
    assert "recovered task 'code'" in out
    recovered = read_tensors(tmp_path / "recovered")
    assert set(recovered) == set(synthetic.base_tensors)
    for name, value in synthetic.task_tensors[1].items():  # full rank kept: the task itself
        torch.testing.assert_close(recovered[name], value, rtol=1e-4, atol=1e-5)


def test_revert_of_a_directory_that_is_not_an_artifact(synthetic: Synthetic, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    code, _, err = run(capsys, "revert", synthetic.base, "--task", "math",
                       "--out", tmp_path / "recovered")
    assert code == 1
    assert "is not a compressed or reversible artifact" in err
    assert_nothing_written(tmp_path / "recovered")


# --------------------------------------------------------------------------------------------
# stopped from outside: docker stop, systemd, timeout send SIGTERM


def _sigterm_once_merging(spec: Path, dest: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `merge-service merge` and send it SIGTERM as soon as its output is being written
    (the temporary sibling exists); the merge itself takes a few seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MERGE_SERVICE_DEBUG", None)
    proc = subprocess.Popen([str(CLI), "merge", str(spec), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not any(n.startswith(".") and ".partial-" in n for n in os.listdir(dest.parent)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the merge never started writing"
            time.sleep(0.02)
        time.sleep(0.5)  # in the middle of the tensors, a shard or two written
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _slow_minilm_spec(minilm_dir: Path, minilm_finetunes: list, tmp_path: Path,
                      dest: Path) -> Path:
    """DARE-TIES in float64 on three MiniLM fine-tunes: a few seconds (tests/service's
    slow_spec)."""
    return write_spec(tmp_path, **job(
        minilm_dir, [ft.path for ft in minilm_finetunes], dest, method="dare_ties",
        params={"density": 0.5}, output={"shard_size": "40MB"},
        options={"compute_dtype": "float64", "device": "cpu", "seed": 7}))


@pytest.mark.slow
def test_sigterm_leaves_nothing_at_the_destination(minilm_dir: Path, minilm_finetunes: list,
                                                   tmp_path: Path) -> None:
    dest = tmp_path / "out" / "merged"
    dest.parent.mkdir()
    spec = _slow_minilm_spec(minilm_dir, minilm_finetunes, tmp_path, dest)
    done = _sigterm_once_merging(spec, dest)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "interrupted; nothing was written" in done.stderr
    assert "Traceback" not in done.stderr
    assert_nothing_written(dest)


@pytest.mark.slow
def test_sigterm_during_overwrite_keeps_the_previous_output(
        minilm_dir: Path, minilm_finetunes: list, tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "model.safetensors").write_text("previous output")
    spec = _slow_minilm_spec(minilm_dir, minilm_finetunes, tmp_path, dest)
    done = _sigterm_once_merging(spec, dest, "--overwrite")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert [p.name for p in dest.iterdir()] == ["model.safetensors"]
    assert (dest / "model.safetensors").read_text() == "previous output"
    assert leftovers(dest) == []


def test_main_restores_the_sigterm_handler(synthetic: Synthetic, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    spec = write_spec(tmp_path, **job(synthetic.base, synthetic.tasks, tmp_path / "out"))
    code, _, err = run(capsys, "merge", spec, "-q")
    assert code == 0, err
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a tmpfs needs root")
def test_a_mount_point_destination_is_refused_before_merging(
        synthetic: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A docker volume as the destination: the final rename would fail (EBUSY) only after
    the whole merge; preflight says so first."""
    dest = tmp_path / "volume"
    dest.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(dest)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (dest / "previous").write_text("keep")
        spec = write_spec(tmp_path, **job(synthetic.base, synthetic.tasks, dest))
        code, _, err = run(capsys, "merge", spec, "--overwrite")
        assert code == 1
        assert f"destination {dest} is a mount point" in err
        assert [p.name for p in dest.iterdir()] == ["previous"]
        assert leftovers(dest) == []
    finally:
        subprocess.run(["umount", str(dest)], check=True)
