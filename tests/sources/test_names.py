import subprocess
import sys

from merge_service.sources.names import prefix_change

BASE = {"embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.output.dense.weight", "pooler.dense.weight"}


def test_names_already_in_place_stay() -> None:
    change = prefix_change(["encoder.layer.0.output.dense.weight", "pooler.dense.weight"], BASE)
    assert change("encoder.layer.0.output.dense.weight") == "encoder.layer.0.output.dense.weight"


def test_a_leading_component_is_stripped() -> None:
    names = ["bert.encoder.layer.0.attention.self.query.weight", "bert.pooler.dense.weight",
             "classifier.weight"]
    change = prefix_change(names, BASE)
    assert [change(n) for n in names[:2]] == ["encoder.layer.0.attention.self.query.weight",
                                               "pooler.dense.weight"]


def test_a_leading_component_is_added() -> None:
    targets = {f"bert.{n}" for n in BASE}
    name = "encoder.layer.0.output.dense.weight"
    assert prefix_change([name], targets)(name) == f"bert.{name}"


def test_a_tie_is_broken_the_same_way_in_every_process() -> None:
    # two prefixes place one name each: the first in sorted order wins, whatever the hash seed
    code = ("from merge_service.sources.names import prefix_change;"
            "print(prefix_change(['x'], {'zeta.x', 'alpha.x', 'mid.x'})('x'))")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": str(seed)}).stdout.strip()
            for seed in range(6)}
    assert seen == {"alpha.x"}
