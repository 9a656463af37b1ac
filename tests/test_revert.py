"""`revert` of a damaged `compressed` (TSV-C) artifact: every part is checked against the base
from the headers, so a wrong part is exit 1 with a message naming the tensor and the part, and
nothing is written. The `reversible` (rmm) counterparts are in test_reversible.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_service.cli import main
from merge_service.engine import run_merge
from merge_service.spec import spec_from_dict
from tests.conftest import Synthetic, assert_nothing_written, job

Q = "layers.0.self_attn.q_proj.weight"  # 8 × 8 in the base: U [8, 8], S [8], V [8, 8] kept


@pytest.fixture
def compressed(synthetic: Synthetic, tmp_path: Path) -> Path:
    models = [{"source": str(p), "name": n}
              for p, n in zip(synthetic.tasks, ("math", "code"), strict=True)]
    return run_merge(spec_from_dict(job(
        synthetic.base, models, tmp_path / "artifact", method="tsv_compress",
        params={"rank_fraction": 1.0}, output={"format": "compressed"}))).destination


@pytest.mark.parametrize(("change", "message"), [
    # the reviewer's case: an int8 S was accepted and the weight written as int8
    (lambda t: t.update({f"{Q}::0::S": t[f"{Q}::0::S"].round().to(torch.int8)}),
     f"artifact / {Q}: part S is stored as torch.int8, expected a floating-point dtype"),
    (lambda t: t.update({f"{Q}::0::U": torch.zeros(8, 3)}),
     f"artifact / {Q}: compressed artifact parts do not fit together: U [8, 3], S [8], V [8, 8] "
     "(expected U [m, k], S [k], V [n, k])"),
    (lambda t: t.update({f"{Q}::0::S": torch.zeros(5)}),
     "compressed artifact parts do not fit together: U [8, 8], S [5], V [8, 8]"),
    (lambda t: t.update({f"{Q}::0::U": torch.tensor(1.0)}),
     "compressed artifact parts do not fit together: U [], S [8], V [8, 8]"),
    (lambda t: t.update({f"{Q}::0::U": torch.zeros(5, 8)}),
     f"artifact / {Q}: the recovered delta has shape [5, 8] (from S [8], U [5, 8], V [8, 8]), "
     "the base tensor [8, 8]"),
    (lambda t: t.update({"norm.weight::0::delta": torch.zeros(3)}),
     "artifact / norm.weight: the recovered delta has shape [3] (from delta [3]), the base "
     "tensor [8]"),
    (lambda t: t.update({f"{Q}::0::ZZ": torch.zeros(2)}),
     f"artifact / {Q}: compressed artifact has unexpected part(s) ZZ (found S, U, V, ZZ; "
     "expected U, S, V or delta)"),
    (lambda t: t.update({f"{Q}::0::delta": torch.zeros(8, 8)}),
     "compressed artifact has unexpected part(s) S, U, V (found S, U, V, delta;"),
    (lambda t: t.update({f"{Q}::7::U": torch.zeros(2)}),
     f"artifact: tensor '{Q}::7::U' has task index '7' (expected 0 to 1 for the tasks math, "
     "code, or shared)"),
], ids=["integer", "U-misfit", "S-misfit", "U-0-dim", "wrong-shape", "delta-shape",
        "unknown-part", "delta-and-USV", "task-index"])
def test_damaged_parts_exit_1_and_write_nothing(
        compressed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        change: Callable[[dict[str, torch.Tensor]], object], message: str) -> None:
    path = compressed / "compressed.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    code = main(["revert", str(compressed), "--task", "math", "--out", str(tmp_path / "rev")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert message in err, err
    assert_nothing_written(tmp_path / "rev")


def test_a_float16_part_is_accepted(compressed: Path, synthetic: Synthetic, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Any floating-point dtype is a valid part; the sums are done in float32."""
    path = compressed / "compressed.safetensors"
    tensors = load_file(path)
    tensors[f"{Q}::0::U"] = tensors[f"{Q}::0::U"].half()
    save_file(tensors, path)
    code = main(["revert", str(compressed), "--task", "math", "--out", str(tmp_path / "rev"),
                 "-q"])
    assert code == 0, capsys.readouterr().err
    recovered = load_file(tmp_path / "rev" / "model.safetensors")
    torch.testing.assert_close(recovered[Q].float(), synthetic.task_tensors[0][Q],
                               rtol=0, atol=1e-3)


def test_destination_problems_name_the_out_option(compressed: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """revert has no spec: a destination it refuses is named by its own option, `--out`."""
    existing = tmp_path / "existing"
    existing.mkdir()
    for out, extra, message in [
            (existing, [], "already exists"),
            (compressed / "inside", [], "is inside the input"),
            (compressed, ["--overwrite"], "--overwrite would delete")]:
        code = main(["revert", str(compressed), "--task", "math", "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 1 and message in err, err
        assert "--out" in err and "output.destination" not in err, err
        assert "merge-service merge" not in err, err
    assert list(existing.iterdir()) == [] and not (compressed / "inside").exists()
