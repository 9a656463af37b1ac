"""`adarank` end to end through `run_merge` (METHODS.md section 12): a tiny random Llama (causal
LM, full fine-tunes and PEFT adapters) and MiniLM with per-task classification heads; the
bad-input cases of preflight.

Real files throughout: models and tokenizers saved by `transformers`, adapters by `peft`,
heads with `safetensors`, calibration data as JSONL.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_service.engine import Progress, prepare, run_merge
from merge_service.errors import MergeCancelled, PreflightError
from merge_service.spec import spec_from_dict
from tests.conftest import (
    assert_nothing_written,
    build_adapter,
    job,
    offline,
    perturbed,
    read_tensors,
    relative_error,
    write_checkpoint,
)

WORDS = ["the", "a", "one", "two", "red", "blue", "green", "cat", "dog", "bird", "fish", "runs",
         "sleeps", "eats", "jumps", "sings", "quickly", "slowly", "under", "over", "near", "far",
         "big", "small", "old", "new", "happy", "sad"]


def sentences(seed: int, count: int, length: int = 7) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (count, length), generator=gen)
    return [" ".join(WORDS[i] for i in row) for row in idx.tolist()]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def calibration(paths: dict[str, Path], **extra) -> dict:
    return {name: {"path": str(p), **extra} for name, p in paths.items()}


def run(spec: dict, **kwargs):
    with offline():
        return run_merge(spec_from_dict(spec), **kwargs)


# ---------------------------------------------------------------------------------------------
# a tiny random Llama with a word-level tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("adarank") / "tiny-llama"
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)
    with offline():
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("llama_adapters")
    out = {}
    with offline():
        for seed, (name, config) in enumerate({
            "math": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
            "code": {"r": 6, "lora_alpha": 6, "target_modules": ["q_proj", "o_proj", "down_proj"],
                     "use_rslora": True},
        }.items(), 40):
            model = AutoModelForCausalLM.from_pretrained(tiny_llama)
            out[name] = build_adapter(model, root / name, seed, **config)
    return out


@pytest.fixture(scope="session")
def llama_finetunes(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two full "fine-tunes": every float tensor plus 5e-2·std noise."""
    root = tmp_path_factory.mktemp("llama_finetunes")
    base = read_tensors(tiny_llama)
    return [write_checkpoint(root / f"ft{seed}", perturbed(base, seed, scale=5e-2),
                             copy_from=tiny_llama) for seed in (1, 2)]


@pytest.fixture(scope="session")
def llama_calibration(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_calibration")
    return {name: write_jsonl(root / f"{name}.jsonl", sentences(seed, 24))
            for seed, name in enumerate(("math", "code", "ft1", "ft2"))}


def llama_job(base_dir: Path, models: list[dict], out: Path, cal: dict[str, Path], **params):
    names = [m["name"] for m in models]
    return job(base_dir, models, out, "adarank", params,
               calibration=calibration({n: cal[n] for n in names}),
               options={"device": "cpu"})


def test_steps_zero_prior_one_is_task_arithmetic(tiny_llama: Path, llama_finetunes: list[Path],
                                                 llama_adapters: dict[str, Path],
                                                 llama_calibration: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """All-ones masks (initial_rank_ratio 1) with λ = 1 and no step: θ0 + Σ w_t τ_t, in float64,
    for full checkpoints and for LoRA adapters (factored from B_t, A_t)."""
    full = [{"source": str(p), "name": f"ft{i}", "weight": w}
            for i, (p, w) in enumerate(zip(llama_finetunes, (1.0, 0.5), strict=True), 1)]
    lora = [{"source": str(p), "name": n, "weight": w}
            for (n, p), w in zip(llama_adapters.items(), (0.7, 1.2), strict=True)]
    for label, models in (("full", full), ("lora", lora)):
        ada = llama_job(tiny_llama, models, tmp_path / f"ada-{label}", llama_calibration,
                        steps=0, prior=1.0, initial_rank_ratio=1.0)
        ada["options"]["compute_dtype"] = "float64"
        ta = job(tiny_llama, models, tmp_path / f"ta-{label}", "task_arithmetic", {"alpha": 1.0},
                 space="full", options={"device": "cpu", "compute_dtype": "float64"})
        result = run(ada)
        run(ta)
        assert result.report["space"] == "full"
        got = read_tensors(tmp_path / f"ada-{label}")
        expected = read_tensors(tmp_path / f"ta-{label}")
        assert got.keys() == expected.keys()
        for name in expected:
            assert relative_error(got[name], expected[name]) < 1e-6, (label, name)
        entry = result.report["tensors"]["model.layers.0.self_attn.q_proj.weight"]
        assert entry["kept_rank"] == entry["rank"]
        assert set(entry["lambda"].values()) == {1.0}
        assert result.report["adarank"]["loss_curve"] == []


def test_cart_base_uses_the_average_and_its_defaults(tiny_llama: Path,
                                                     llama_finetunes: list[Path],
                                                     llama_calibration: dict[str, Path],
                                                     tmp_path: Path) -> None:
    models = [{"source": str(p), "name": f"ft{i}", "weight": w}
              for i, (p, w) in enumerate(zip(llama_finetunes, (1.0, 3.0), strict=True), 1)]
    # λ = 0: the static model is θ_b itself, which for cart is θ̄ (the `average` method)
    run(llama_job(tiny_llama, models, tmp_path / "zero", llama_calibration, base="cart",
                  prior=0.0, steps=0))
    run(job(tiny_llama, models, tmp_path / "avg", "average", options={"device": "cpu"}))
    got, average = read_tensors(tmp_path / "zero"), read_tensors(tmp_path / "avg")
    for name in average:
        assert relative_error(got[name], average[name]) < 1e-6, name

    # defaults: prior 2.0 and initial_rank_ratio 0.16: θ̄ + 2 Σ_t SVD_k(w_t (θ_t − θ̄)),
    # k = floor(0.16 · r_t)
    result = run(llama_job(tiny_llama, models, tmp_path / "cart", llama_calibration,
                           base="cart", steps=0))
    params = result.report["adarank"]["params"]
    assert (params["prior"], params["initial_rank_ratio"]) == (2.0, 0.16)
    base = read_tensors(tiny_llama)
    tasks = [read_tensors(p) for p in llama_finetunes]
    weights = [1.0, 3.0]
    merged = read_tensors(tmp_path / "cart")
    name = "model.layers.1.mlp.up_proj.weight"  # 48 × 32: full-rank deviations, r_t = 32
    entry = result.report["tensors"][name]
    assert entry["rank"] == {"ft1": 32, "ft2": 32}
    assert entry["kept_rank"] == {"ft1": 5, "ft2": 5}  # floor(0.16 · 32)
    thetas = [t[name].double() for t in tasks]
    mean = sum(w * t for w, t in zip(weights, thetas, strict=True)) / sum(weights)
    expected = mean.clone()
    for w, t in zip(weights, thetas, strict=True):
        u, s, vh = torch.linalg.svd(w * (t - mean))
        expected += 2.0 * (u[:, :5] * s[:5]) @ vh[:5]
    assert relative_error(merged[name], expected) < 1e-5
    # non-matrix tensors: θ̄ + 2 Σ_t w_t (θ_t − θ̄)
    norm = "model.layers.0.input_layernorm.weight"
    expected_norm = base[norm].double() * 0 + sum(
        w * t[norm].double() for w, t in zip(weights, tasks, strict=True)) / sum(weights)
    expected_norm = expected_norm + 2.0 * sum(
        w * (t[norm].double() - expected_norm) for w, t in zip(weights, tasks, strict=True))
    assert relative_error(merged[norm], expected_norm) < 1e-6


def test_lora_masks_keep_the_top_singular_values(tiny_llama: Path,
                                                 llama_adapters: dict[str, Path],
                                                 llama_calibration: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """initial_rank_ratio 0.5, no step: θ0 + prior Σ_t SVD_{floor(r_t/2)}(ΔW_t), with ΔW_t
    taken from peft's own merge of each adapter."""
    from tests.conftest import peft_merged_state

    models = [{"source": str(p), "name": n} for n, p in llama_adapters.items()]
    result = run(llama_job(tiny_llama, models, tmp_path / "out", llama_calibration, steps=0,
                           initial_rank_ratio=0.5))
    merged = read_tensors(tmp_path / "out")
    base = {k: v.double() for k, v in read_tensors(tiny_llama).items()}
    name = "model.layers.0.self_attn.q_proj.weight"  # adapted by both (ranks 4 and 6)
    assert result.report["tensors"][name]["rank"] == {"math": 4, "code": 6}
    assert result.report["tensors"][name]["kept_rank"] == {"math": 2, "code": 3}
    expected = base[name].clone()
    for adapter in llama_adapters.values():
        delta = peft_merged_state(tiny_llama, [adapter], "AutoModelForCausalLM")[name].double() \
            - base[name]
        u, s, vh = torch.linalg.svd(delta)
        k = int((s > 1e-5 * s[0]).sum()) // 2
        expected += 0.3 * (u[:, :k] * s[:k]) @ vh[:k]
    assert relative_error(merged[name], expected) < 1e-4


def test_causal_lm_end_to_end(tiny_llama: Path, llama_adapters: dict[str, Path],
                              llama_calibration: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    models = [{"source": str(p), "name": n} for n, p in llama_adapters.items()]
    events: list[Progress] = []
    spec = llama_job(tiny_llama, models, tmp_path / "out", llama_calibration, steps=4, lr=0.05,
                     batch_size=8)
    result = run(spec, progress=events.append)
    report = result.report["adarank"]
    assert len(report["loss_curve"]) == 4 and all(x > 0 for x in report["loss_curve"])
    assert report["family"].startswith("causal language model")
    assert report["calibration"]["math"]["samples"] == 24
    steps = [(e.done, e.total) for e in events if e.stage == "optimizing"]
    assert steps == [(i, 4) for i in range(5)]
    assert any(e.stage == "factorizing" for e in events)
    for name, entry in result.report["tensors"].items():
        assert set(entry["lambda"]) == {"math", "code"}
        assert entry["lambda"] != {"math": 0.3, "code": 0.3}, name  # λ was learned
        if "kept_rank" in entry:
            assert all(0 <= entry["kept_rank"][t] <= entry["rank"][t] for t in entry["rank"])
    with offline():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.model_type == "llama"
    merged = read_tensors(tmp_path / "out")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, merged[key])
    written = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert written["adarank"]["loss_curve"] == report["loss_curve"]


def test_runs_are_deterministic_and_cancel_between_steps(tiny_llama: Path,
                                                         llama_adapters: dict[str, Path],
                                                         llama_calibration: dict[str, Path],
                                                         tmp_path: Path) -> None:
    models = [{"source": str(p), "name": n} for n, p in llama_adapters.items()]
    first = run(llama_job(tiny_llama, models, tmp_path / "a", llama_calibration, steps=2,
                          batch_size=5))
    second = run(llama_job(tiny_llama, models, tmp_path / "b", llama_calibration, steps=2,
                           batch_size=5))
    assert first.report["adarank"]["loss_curve"] == second.report["adarank"]["loss_curve"]
    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)

    seen: list[Progress] = []
    with pytest.raises(MergeCancelled, match="after 2 of 10 optimisation steps"):
        run(llama_job(tiny_llama, models, tmp_path / "c", llama_calibration, steps=10),
            progress=seen.append,
            should_cancel=lambda: sum(e.stage == "optimizing" for e in seen) >= 2)
    assert_nothing_written(tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# MiniLM with three LoRA adapters and a classification head per task


@pytest.fixture(scope="session")
def minilm_tasks(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, Path]:
    """`<task>/adapter/` (a PEFT LoRA on the BertModel) with `<task>/head.safetensors` beside it
    (a linear layer on mean-pooled states), and `<task>/calibration.jsonl`: the layout of the
    example tasks under examples/tasks/."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("minilm_tasks")
    out = {}
    with offline():
        for seed, (name, labels) in enumerate((("topic", 4), ("mood", 2), ("lang", 3)), 70):
            model = AutoModel.from_pretrained(minilm_dir)
            build_adapter(model, root / name / "adapter", seed, r=8, lora_alpha=16,
                          target_modules=["query", "value", "dense"])
            gen = torch.Generator().manual_seed(seed)
            save_file({"weight": torch.randn(labels, 384, generator=gen) * 0.5,
                       "bias": torch.zeros(labels)}, root / name / "head.safetensors",
                      metadata={"pooling": "mean"})
            write_jsonl(root / name / "calibration.jsonl", sentences(seed, 32))
            out[name] = root / name
    return out


@pytest.fixture(scope="session")
def example_tasks() -> dict[str, Path]:
    """Three committed example tasks of different ranks (examples/tasks/<task>/: adapter/,
    head.safetensors, calibration.jsonl): the real trained adapters."""
    from examples.tasks.evaluate import TASKS_DIR

    return {n: TASKS_DIR / n for n in ("wordnet_pos", "wordnet_noun_lexfile", "word_pos")}


@pytest.mark.slow
def test_minilm_twenty_steps_lower_the_entropy(minilm_dir: Path, example_tasks: dict[str, Path],
                                               tmp_path: Path) -> None:
    models = [{"source": str(p / "adapter"), "name": n} for n, p in example_tasks.items()]
    spec = job(minilm_dir, models, tmp_path / "out", "adarank", {"steps": 20, "batch_size": 8},
               calibration={n: {"path": str(p / "calibration.jsonl"), "max_samples": 64}
                            for n, p in example_tasks.items()},
               options={"device": "cpu"})
    started = time.perf_counter()
    result = run(spec)
    elapsed = time.perf_counter() - started
    report = result.report["adarank"]
    entropy = report["calibration_entropy"]
    before, after = sum(entropy["initial"].values()), sum(entropy["final"].values())
    print(f"\nMiniLM, 3 adapters ({', '.join(example_tasks)}), 20 steps on CPU: "
          f"{report['timings_s']['per_step']:.3f} s/step, minibatch loss at step 0 "
          f"{report['loss_curve'][0]:.5f}, step 19 {report['loss_curve'][-1]:.5f}; calibration "
          f"entropy {before:.5f} -> {after:.5f}; whole merge {elapsed:.1f} s")
    assert report["family"].startswith("sequence classification")
    assert len(report["loss_curve"]) == 20
    assert after < before  # on the whole calibration set (the per-step losses are minibatches)
    ranks = {n: json.loads((p / "adapter" / "adapter_config.json").read_text())["r"]
             for n, p in example_tasks.items()}
    lora = [e for e in result.report["tensors"].values() if "rank" in e]
    assert lora and all(e["rank"][n] <= ranks[n] and e["kept_rank"][n] <= e["rank"][n]
                        for e in lora for n in ranks)
    with offline():
        from transformers import AutoModel

        AutoModel.from_pretrained(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# bad inputs: every problem at once, nothing written


def problems_of(spec: dict) -> list[str]:
    with offline(), pytest.raises(PreflightError) as info:
        prepare(spec_from_dict(spec))
    return [str(p) for p in info.value.problems]


def test_missing_and_bad_calibration_data(tiny_llama: Path, llama_adapters: dict[str, Path],
                                          tmp_path: Path) -> None:
    models = [{"source": str(p), "name": n} for n, p in llama_adapters.items()]
    out = tmp_path / "out"
    none = problems_of(job(tiny_llama, models, out, "adarank"))
    assert any("adarank needs calibration data" in p for p in none)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", ["x", "y"], field="sentence")
    found = problems_of(job(tiny_llama, models, out, "adarank", calibration={
        "math": {"path": str(empty)},
        "extra": {"path": str(wrong)},
    }))
    text = "\n".join(found)
    assert "calibration.math: calibration file" in text and "is empty" in text
    assert "calibration / code: task 'code' has no calibration data" in text
    assert "calibration.extra: calibration data for 'extra', which is not a task" in text

    found = problems_of(job(tiny_llama, models, out, "adarank", calibration={
        "math": {"path": str(tmp_path / "nope.jsonl")},
        "code": {"path": str(wrong)},
    }))
    text = "\n".join(found)
    assert "nope.jsonl does not exist" in text
    assert "wrong.jsonl: lines 1, 2 has no field 'text'" in text
    assert_nothing_written(out)


def test_no_head_for_a_sequence_classification_task(minilm_dir: Path,
                                                    minilm_tasks: dict[str, Path],
                                                    minilm_adapters: dict[str, Path],
                                                    tmp_path: Path) -> None:
    headless = minilm_adapters["qv"]  # a MiniLM adapter with no head.safetensors near it
    models = [{"source": str(minilm_tasks["topic"] / "adapter"), "name": "topic"},
              {"source": str(headless), "name": "qv"}]
    cal = write_jsonl(tmp_path / "c.jsonl", sentences(0, 4))
    found = problems_of(job(minilm_dir, models, tmp_path / "out", "adarank",
                            calibration={"topic": {"path": str(cal)}, "qv": {"path": str(cal)}}))
    assert len(found) == 1, found
    assert found[0].startswith("qv: no classification head found for this task")
    assert "head.safetensors" in found[0]
    assert_nothing_written(tmp_path / "out")


def test_unsupported_architecture_and_format(synthetic, tmp_path: Path) -> None:
    cal = write_jsonl(tmp_path / "c.jsonl", sentences(0, 4))
    models = [{"source": str(p), "name": f"t{i}"} for i, p in enumerate(synthetic.tasks)]
    spec = job(synthetic.base, models, tmp_path / "out", "adarank",
               calibration={"t0": {"path": str(cal)}, "t1": {"path": str(cal)}},
               output={"format": "compressed"})
    found = problems_of(spec)
    text = "\n".join(found)
    assert "base: unsupported architecture" in text
    assert "cannot produce format 'compressed'" in text
    assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# f_t, checked against transformers itself: at steps 0 with prior 1 the merged model is task
# arithmetic, so the reported initial entropy must be that of the task arithmetic merge


def reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def tokenized(directory: Path, texts: list[str]):
    from transformers import AutoTokenizer

    with offline():
        return AutoTokenizer.from_pretrained(directory)(texts, padding=True, truncation=True,
                                                        return_tensors="pt")


def test_external_heads_read_mean_pooled_states(minilm_dir: Path, minilm_tasks: dict[str, Path],
                                                tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModel

    models = [{"source": str(p / "adapter"), "name": n} for n, p in minilm_tasks.items()]
    cal = {n: {"path": str(p / "calibration.jsonl"), "max_samples": 8}
           for n, p in minilm_tasks.items()}
    result = run(job(minilm_dir, models, tmp_path / "ada", "adarank",
                     {"steps": 0, "prior": 1.0, "batch_size": 8}, calibration=cal,
                     options={"device": "cpu"}))
    run(job(minilm_dir, models, tmp_path / "ta", "task_arithmetic", {"alpha": 1.0},
            space="full", options={"device": "cpu"}))
    with offline():
        encoder = AutoModel.from_pretrained(tmp_path / "ta").eval()
    initial = result.report["adarank"]["calibration_entropy"]["initial"]
    for name, directory in minilm_tasks.items():
        texts = [json.loads(line)["text"]
                 for line in (directory / "calibration.jsonl").read_text().splitlines()[:8]]
        batch = tokenized(minilm_dir, texts)
        head = load_file(directory / "head.safetensors")
        with torch.no_grad():
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            logits = pooled @ head["weight"].T + head["bias"]
        expected = float(reference_entropy(logits).mean())
        assert initial[name] == pytest.approx(expected, rel=1e-4), name


@pytest.fixture(scope="session")
def tiny_classifier(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> tuple[Path, list[Path]]:
    """A tiny random `BertForSequenceClassification` (3 labels) and two full fine-tunes, each
    with its own classifier: the built-in head family."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("tiny_classifier")
    torch.manual_seed(1)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=48, max_position_embeddings=64,
                        num_labels=3)
    with offline():
        BertForSequenceClassification(config).save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the word-level tokenizer
        shutil.copy(tiny_llama / name, root / "base" / name)
    base = read_tensors(root / "base")
    tasks = [write_checkpoint(root / f"ft{seed}", perturbed(base, seed, scale=0.2),
                              copy_from=root / "base") for seed in (1, 2)]
    return root / "base", tasks


def test_built_in_heads_use_each_tasks_own_classifier(tiny_classifier, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    base, tasks = tiny_classifier
    models = [{"source": str(p), "name": p.name} for p in tasks]
    texts = {p.name: sentences(i, 6) for i, p in enumerate(tasks)}
    cal = {n: {"path": str(write_jsonl(tmp_path / f"{n}.jsonl", t))} for n, t in texts.items()}
    result = run(job(base, models, tmp_path / "ada", "adarank",
                     {"steps": 0, "prior": 1.0}, calibration=cal, options={"device": "cpu"}))
    assert "classifier.weight" in result.report["adarank"]["family"]
    run(job(base, models, tmp_path / "ta", "task_arithmetic", {"alpha": 1.0},
            options={"device": "cpu"}))
    initial = result.report["adarank"]["calibration_entropy"]["initial"]
    with offline():
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ta").eval()
    for task in tasks:
        own = read_tensors(task)
        with torch.no_grad():
            merged.classifier.weight.copy_(own["classifier.weight"])
            merged.classifier.bias.copy_(own["classifier.bias"])
            logits = merged(**tokenized(base, texts[task.name])).logits
        expected = float(reference_entropy(logits).mean())
        assert initial[task.name] == pytest.approx(expected, rel=1e-4), task.name

    # a task model without its own head tensors: preflight names it
    headless = write_checkpoint(tmp_path / "headless",
                                {k: v for k, v in read_tensors(tasks[0]).items()
                                 if not k.startswith("classifier.")}, copy_from=base)
    found = problems_of(job(base, [models[0], {"source": str(headless), "name": "headless"}],
                            tmp_path / "out", "adarank",
                            calibration={"ft1": cal["ft1"], "headless": cal["ft1"]}))
    assert any(p.startswith("headless: no classification head found") for p in found), found


def test_base_without_a_tokenizer(tiny_llama: Path, llama_adapters: dict[str, Path],
                                  llama_calibration: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "tiny-llama"  # the adapters name their base by this directory name
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, bare / name)
    models = [{"source": str(p), "name": n} for n, p in llama_adapters.items()]
    found = problems_of(llama_job(bare, models, tmp_path / "out", llama_calibration))
    assert len(found) == 1 and found[0].startswith("base: adarank tokenizes the calibration "
                                                   "data with the base's tokenizer"), found
    assert_nothing_written(tmp_path / "out")
