"""The example tasks and their committed adapters (examples/tasks/).

The data files parse and are consistent; every adapter loads with `peft` onto MiniLM's
`BertModel` and, with its head, reproduces the test accuracy recorded when it was trained;
the recorded numbers beat chance and the frozen-base baseline; and the adapters go through
merge-service's preflight and a task-arithmetic merge (LoRA output) against the MiniLM base.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from examples.tasks import evaluate as tasks
from examples.tasks.evaluate import TASK_NAMES, TaskDataError, load_task
from merge_service.cli import main as cli_main
from merge_service.engine import run_merge
from merge_service.errors import PreflightError
from merge_service.spec import spec_from_dict
from tests.conftest import job, offline, write_spec

DATA_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "calibration.jsonl",
              "labels.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
HIDDEN = 384


@pytest.fixture(scope="module", autouse=True)
def _offline() -> object:
    with offline():
        yield


# ---------------------------------------------------------------------------------------------
# data


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_files_exist_parse_and_are_small(name: str) -> None:
    directory = tasks.TASKS_DIR / name
    for filename in DATA_FILES:
        assert (directory / filename).is_file(), filename
    data_bytes = sum((directory / f).stat().st_size for f in DATA_FILES)
    assert data_bytes < 400_000
    task = load_task(name)
    assert 2 <= len(task.labels) <= 10
    for split in tasks.SPLITS:
        examples = task.split(split)
        # balanced: every label, equally often
        counts = torch.bincount(torch.tensor([e.label for e in examples]),
                                minlength=len(task.labels))
        assert counts.min() == counts.max() > 0, split
    texts = {s: {e.text for e in task.split(s)} for s in tasks.SPLITS}
    assert all(len(texts[s]) == len(task.split(s)) for s in tasks.SPLITS)  # no duplicates
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    # calibration: unlabeled texts taken from train
    assert 64 <= len(task.calibration) <= 256
    assert len(set(task.calibration)) == len(task.calibration)
    assert set(task.calibration) <= texts["train"]
    for line in task.calibration_path.read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) == {"text"}


def test_at_least_six_tasks_and_no_two_the_same_problem() -> None:
    """Tasks with the same labels classify different texts (wordnet_pos: a definition's part of
    speech, word_pos: a word's); tasks with different labels may share a text."""
    loaded = [load_task(n) for n in TASK_NAMES]
    assert len(loaded) >= 6
    assert len({t.labels for t in loaded}) >= 5
    texts = {t.name: {e.text for s in tasks.SPLITS for e in t.split(s)} for t in loaded}
    for a, b in itertools.combinations(loaded, 2):
        if set(a.labels) == set(b.labels):
            assert not texts[a.name] & texts[b.name], (a.name, b.name)


def test_load_task_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="no task"):
        load_task("no_such_task", tmp_path)
    task_dir = tmp_path / "broken"
    task_dir.mkdir()
    (task_dir / "labels.json").write_text('["a", "b"]')
    for split in tasks.SPLITS:
        (task_dir / f"{split}.jsonl").write_text('{"text": "x y", "label": "a"}\n')
    (task_dir / "calibration.jsonl").write_text('{"text": "x y"}\n')
    assert load_task("broken", tmp_path).labels == ("a", "b")
    load_task.cache_clear()
    (task_dir / "test.jsonl").write_text('{"text": "x y", "label": "c"}\n')
    with pytest.raises(TaskDataError, match="'c' is not one of"):
        load_task("broken", tmp_path)
    load_task.cache_clear()
    (task_dir / "test.jsonl").write_text('{"text": "x y", "label": "a"}\n')
    (task_dir / "calibration.jsonl").write_text('{"text": "x y", "label": "a"}\n')
    with pytest.raises(TaskDataError, match=r"calibration\.jsonl:1"):
        load_task("broken", tmp_path)
    load_task.cache_clear()


# ---------------------------------------------------------------------------------------------
# adapters and heads


def test_adapters_exist_for_every_task_with_ranks_4_8_16() -> None:
    for name in TASK_NAMES:
        assert (tasks.TASKS_DIR / name / "metrics.json").is_file(), name
    ranks = {json.loads((load_task(n).adapter_dir / "adapter_config.json").read_text())["r"]
             for n in TASK_NAMES}
    assert {4, 8, 16} <= ranks


@pytest.mark.parametrize("name", TASK_NAMES)
def test_adapter_is_a_peft_lora_of_bert_with_trained_factors(name: str) -> None:
    task = load_task(name)
    for filename in ADAPTER_FILES:
        assert (task.adapter_dir / filename).is_file()
    config = json.loads((task.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == tasks.BASE_MODEL_NAME
    factors = load_file(task.adapter_dir / "adapter_model.safetensors")
    modules = {k.rsplit(".lora_", 1)[0] for k in factors}
    # q, k, v, attention output, intermediate and output dense of all 6 layers; no pooler
    assert len(modules) == 6 * 6
    assert all(m.startswith("base_model.model.encoder.layer.") for m in modules)
    for key, value in factors.items():
        assert value.dtype == torch.float32
        assert value.abs().max() > 0, f"{key} is zero: not trained"
        rank_dim = 0 if ".lora_A." in key else 1
        assert value.shape[rank_dim] == config["r"], key
    assert (task.adapter_dir / "adapter_model.safetensors").stat().st_size < 3_000_000


@pytest.mark.parametrize("name", TASK_NAMES)
def test_head_matches_labels(name: str) -> None:
    task = load_task(name)
    head = tasks.load_head(task)
    assert head.weight.shape == (len(task.labels), HIDDEN)
    with safe_open(task.head_path, "pt") as f:
        assert json.loads(f.metadata()["labels"]) == list(task.labels)
    assert task.metrics()["labels"] == list(task.labels)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_recorded_accuracy_beats_chance_and_frozen_base(name: str) -> None:
    m = load_task(name).metrics()
    assert m["chance"] == pytest.approx(1 / len(m["labels"]))
    for split in ("validation", "test"):
        adapter, base = m["adapter_head"][split], m["base_head"][split]
        assert adapter > m["chance"] + 0.2, split
        assert adapter > base + 0.02, split


@pytest.fixture(scope="module")
def base_model() -> torch.nn.Module:
    return tasks.load_base()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_adapter_loads_with_peft_and_reproduces_its_test_accuracy(name: str) -> None:
    """`PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter)` with the task's
    head scores what metrics.json says (within 0.5 %)."""
    from peft import PeftModel
    from transformers import AutoModel

    task = load_task(name)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tasks.base_model_path()),
                                      task.adapter_dir)
    accuracy = tasks.evaluate(model, task, "test")
    assert accuracy == pytest.approx(task.metrics()["adapter_head"]["test"], abs=0.005)


def test_evaluate_of_the_base_is_below_the_adapter(base_model: torch.nn.Module) -> None:
    """The same head on the encoder without the adapter: worse (the adapter matters)."""
    name = TASK_NAMES[0]
    task = load_task(name)
    adapted = tasks.evaluate(tasks.load_adapted(task), task, "validation")
    plain = tasks.evaluate(base_model, task, "validation")
    assert adapted == pytest.approx(task.metrics()["adapter_head"]["validation"], abs=0.005)
    assert plain < adapted


# ---------------------------------------------------------------------------------------------
# through merge-service


def _spec(tmp_path: Path, names: list[str], **fields: object) -> dict:
    return job(tasks.base_model_path(), [load_task(n).adapter_dir for n in names],
               tmp_path / "merged", method="task_arithmetic", params={"alpha": 1.0},
               space="core", output={"destination": str(tmp_path / "merged"),
                                     "format": "lora"}, **fields)


def test_adapters_pass_validate_against_the_minilm_base(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, **_spec(tmp_path, list(TASK_NAMES[:3])))
    assert cli_main(["validate", str(spec)]) == 0, capsys.readouterr()
    assert not (tmp_path / "merged").exists()


def test_adapter_of_another_base_is_refused(tmp_path: Path) -> None:
    """The committed adapters name the Hub id; a base known by another name is refused."""
    name = TASK_NAMES[0]
    other = tmp_path / "other_adapter"
    other.mkdir()
    config = json.loads((load_task(name).adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "prajjwal1/bert-tiny"
    (other / "adapter_config.json").write_text(json.dumps(config))
    (other / "adapter_model.safetensors").write_bytes(
        (load_task(name).adapter_dir / "adapter_model.safetensors").read_bytes())
    spec = job(tasks.base_model_path(), [load_task(name).adapter_dir, other],
               tmp_path / "merged", space="core")
    with pytest.raises(PreflightError, match="bert-tiny"):
        run_merge(spec_from_dict(spec))
    assert not (tmp_path / "merged").exists()


def test_task_arithmetic_of_two_adapters_merges_to_a_peft_adapter(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two adapters of different ranks, `merge-service merge` in core space with LoRA output:
    the result loads with peft, its update is the sum of the two, and each task's head still
    scores well above chance on the merged encoder."""
    from peft import PeftModel

    names = list(TASK_NAMES[:2])
    spec = write_spec(tmp_path, **_spec(tmp_path, names))
    assert cli_main(["merge", str(spec)]) == 0, capsys.readouterr()
    out = tmp_path / "merged"
    assert (out / "adapter_config.json").is_file()

    def delta(model: torch.nn.Module) -> torch.Tensor:
        merged = model.merge_and_unload()
        return merged.encoder.layer[2].attention.self.query.weight.detach().double()

    base = tasks.load_base().encoder.layer[2].attention.self.query.weight.detach().double()
    expected = sum(delta(PeftModel.from_pretrained(tasks.load_base(), load_task(n).adapter_dir))
                   - base for n in names)
    encoder = PeftModel.from_pretrained(tasks.load_base(), out).eval()
    got = delta(PeftModel.from_pretrained(tasks.load_base(), out)) - base
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    for name in names:
        task = load_task(name)
        assert tasks.evaluate(encoder, task, "validation") > 1.5 / len(task.labels)


def test_model_cards_name_the_base_the_adapters_were_trained_on(tmp_path: Path) -> None:
    """The packaged base's config.json names the model it was trained from
    (`_name_or_path: nreimers/MiniLM-L6-H384-uncased`); its own card (`# all-MiniLM-L6-v2`) and
    the adapters say which model it is. The cards of a merge and of a task reverted from its
    artifact name that one as `base_model`."""
    import yaml

    def front(directory: Path) -> dict:
        return yaml.safe_load((directory / "README.md").read_text().split("---\n")[1])

    config = json.loads((tasks.base_model_path() / "config.json").read_text())
    assert config["_name_or_path"] == "nreimers/MiniLM-L6-H384-uncased"
    artifact = tmp_path / "merged"
    run_merge(spec_from_dict(job(tasks.base_model_path(),
                                 [load_task(n).adapter_dir for n in TASK_NAMES[:2]], artifact,
                                 method="rmm", space="core", output={"format": "reversible"})))
    assert front(artifact)["base_model"] == tasks.BASE_MODEL_NAME
    assert front(artifact)["base_model_relation"] == "adapter"
    reverted = tmp_path / "reverted"
    task = json.loads((artifact / "tasks.json").read_text())["tasks"][0]
    assert cli_main(["revert", str(artifact), "--task", task, "--out", str(reverted)]) == 0
    assert front(reverted)["base_model"] == tasks.BASE_MODEL_NAME


def test_target_rank_is_stated_in_the_report_and_the_model_card(tmp_path: Path) -> None:
    """A `lora` output truncated by `target_rank`: its adapter has that rank, and the report
    and the model card, which list the parameters the merge ran with, say so."""
    import yaml

    spec = _spec(tmp_path, list(TASK_NAMES[:2]))
    spec["method"]["params"]["target_rank"] = 3
    result = run_merge(spec_from_dict(spec))
    out = tmp_path / "merged"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert result.report["method"]["params"] == {"alpha": 1.0, "target_rank": 3}
    card = (out / "README.md").read_text()
    params = yaml.safe_load(card.split("## Method parameters\n\n```yaml\n")[1].split("```")[0])
    assert params == {"alpha": 1.0, "target_rank": 3}


@pytest.mark.parametrize(("options", "field"), [
    ({"include": ["pooler"]}, "options.include"),
    ({"exclude": ["encoder"]}, "options.exclude"),
])
def test_a_selection_that_leaves_nothing_to_merge_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], options: dict, field: str) -> None:
    """The adapters adapt only encoder layers: a selection without them would write the base
    (or, as here, a `lora` output with no module, which PEFT cannot load). Exit 1, the
    option named, nothing written."""
    spec = write_spec(tmp_path, **_spec(tmp_path, list(TASK_NAMES[:2]), options=options))
    assert cli_main(["merge", str(spec)]) == 1
    err = capsys.readouterr().err
    assert f"{field}: " in err and "nothing would be merged" in err, err
    assert not (tmp_path / "merged").exists()
