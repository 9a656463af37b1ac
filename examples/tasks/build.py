"""Build the example text-classification tasks from text that ships in Debian packages.

    apt-get install wordnet-base fortunes-es \
        wamerican wbritish wfrench wngerman witalian wspanish wportuguese
    python examples/tasks/build.py            # writes examples/tasks/<task>/*.jsonl

Every choice is seeded, so the same package versions give byte-identical files; the built files
are committed, so nothing downstream (tests, CI, the quality table) needs these packages.
Provenance and licences: README.md beside this file.

Each task directory gets `train.jsonl`, `validation.jsonl`, `test.jsonl` (`{"text", "label"}`
per line), `calibration.jsonl` (`{"text"}`: a seeded sample of the training texts, labels
removed, for methods such as AdaRank that adapt a merge on unlabeled inputs) and `labels.json`
(the label names in head order).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
DICT = Path("/usr/share/dict")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
SEED = 20261125


class SourceMissingError(RuntimeError):
    """A Debian file the build reads is not installed."""


SPLITS = {"train": 300, "validation": 50, "test": 100}


# ---------------------------------------------------------------------------------------------
# sources


def _read(path: Path) -> str:
    if not path.is_file():
        raise SourceMissingError(f"{path} is missing: install the Debian package that ships it "
                                 "(see examples/tasks/README.md)")
    return path.read_text(encoding="utf-8", errors="replace")


def lexnames() -> dict[int, str]:
    """WordNet's lexicographer file numbers -> names (lexnames(5WN), shipped by wordnet-base)."""
    if not LEXNAMES_MAN.is_file():
        raise SourceMissingError(f"{LEXNAMES_MAN} is missing: apt-get install wordnet-base")
    text = gzip.decompress(LEXNAMES_MAN.read_bytes()).decode("utf-8")
    names = {int(m.group(1)): m.group(2)
             for m in re.finditer(r"^(\d\d)\t([a-z]+\.[A-Za-z]+) *\t", text, re.MULTILINE)}
    if len(names) != 45:
        raise SourceMissingError(f"expected 45 lexicographer files in {LEXNAMES_MAN}, "
                                 f"found {len(names)}")
    return names


def wordnet_glosses(pos: str) -> list[tuple[str, str]]:
    """(lexicographer file, definition) of every synset in data.<pos>, examples stripped.

    A data line is `offset lex_filenum ss_type w_cnt word lex_id ... | gloss`, where the gloss
    is the definition followed by `; "example"` sentences (wndb(5WN)).
    """
    names = lexnames()
    out = []
    for line in _read(WORDNET / f"data.{pos}").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # the licence header
        fields, gloss = line.split(" | ", 1)
        lexfile = names[int(fields.split(" ", 2)[1])]
        definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
        if len(definition.split()) >= 3:
            out.append((lexfile, definition))
    return out


_OVERSTRIKE = re.compile(r".\x08")


def fortunes(path: Path) -> list[str]:
    """The cookies of one fortune file (`%` lines separate them), whitespace collapsed.

    Some files underline with backspace overstrikes (`_\\bx`); those are removed.
    """
    out = []
    for cookie in re.split(r"^%$", _read(path), flags=re.MULTILINE):
        text = " ".join(_OVERSTRIKE.sub("", cookie).split())
        if text:
            out.append(text)
    return out


def words(path: Path) -> list[str]:
    """Lower-case words of a word list (no proper names, abbreviations or possessives)."""
    return [w for w in _read(path).splitlines()
            if w and w == w.lower() and w.isalpha()]


# ---------------------------------------------------------------------------------------------
# tasks: each returns {label: [texts]} from which balanced splits are drawn


def wordnet_pos() -> dict[str, list[str]]:
    """A WordNet definition -> the part of speech of the word it defines."""
    return {label: [d for _, d in wordnet_glosses(pos)]
            for label, pos in (("noun", "noun"), ("verb", "verb"), ("adjective", "adj"),
                               ("adverb", "adv"))}


def wordnet_noun_lexfile() -> dict[str, list[str]]:
    """A noun's definition -> its lexicographer file (the broad semantic class)."""
    keep = ["noun.act", "noun.artifact", "noun.attribute", "noun.cognition",
            "noun.communication", "noun.state"]
    out: dict[str, list[str]] = {k.split(".", 1)[1]: [] for k in keep}
    for lexfile, definition in wordnet_glosses("noun"):
        if lexfile in keep:
            out[lexfile.split(".", 1)[1]].append(definition)
    return out


def word_pos() -> dict[str, list[str]]:
    """A single word -> its part of speech, for the words WordNet lists under exactly one
    (index.noun, index.verb, index.adj, index.adv; no compounds)."""
    seen: dict[str, set[str]] = {}
    for label, pos in (("noun", "noun"), ("verb", "verb"), ("adjective", "adj"),
                       ("adverb", "adv")):
        for line in _read(WORDNET / f"index.{pos}").splitlines():
            if line.startswith("  "):
                continue  # the licence header
            lemma = line.split(" ", 1)[0]
            if lemma.isalpha() and len(lemma) >= 3:
                seen.setdefault(lemma, set()).add(label)
    out: dict[str, list[str]] = {"noun": [], "verb": [], "adjective": [], "adverb": []}
    for lemma, labels in sorted(seen.items()):
        if len(labels) == 1:
            out[next(iter(labels))].append(lemma)
    return out


def word_spelling() -> dict[str, list[str]]:
    """A single English word -> the spelling it is written in, American or British: the words
    of exactly one of the two word lists (color/colour, organize/organise, center/centre,
    traveled/travelled, esthetics/aesthetics)."""
    american = set(words(DICT / "american-english"))
    british = set(words(DICT / "british-english"))
    return {"american": sorted(american - british), "british": sorted(british - american)}


WORD_LISTS = {"english": "american-english", "french": "french", "german": "ngerman",
              "italian": "italian", "spanish": "spanish", "portuguese": "portuguese"}
WORDS_PER_TEXT = 3


def word_language(rng: random.Random) -> dict[str, list[str]]:
    """Three words drawn from one language's word list -> the language.

    Words that occur in more than one of the lists are dropped, so every text has one answer.
    """
    lists = {lang: set(words(DICT / name)) for lang, name in WORD_LISTS.items()}
    counts: dict[str, int] = {}
    for ws in lists.values():
        for w in ws:
            counts[w] = counts.get(w, 0) + 1
    out = {}
    needed = sum(SPLITS.values())
    for lang, ws in lists.items():
        pool = sorted(w for w in ws if counts[w] == 1)
        out[lang] = [" ".join(rng.sample(pool, WORDS_PER_TEXT)) for _ in range(needed)]
    return out


SPANISH_TOPICS = {"arte": "arte", "ciencia": "ciencia", "informatica": "informatica",
                  "poder": "poder", "sentimientos": "sentimientos"}


def fortune_topic_es() -> dict[str, list[str]]:
    """A Spanish fortune cookie -> the fortune file (topic) it comes from (fortunes-es)."""
    return {topic: [c for c in fortunes(FORTUNES / "es" / f"{name}.fortunes")
                    if 20 <= len(c) <= 400]
            for topic, name in SPANISH_TOPICS.items()}


TASKS: dict[str, Callable[[random.Random], dict[str, list[str]]]] = {
    "wordnet_pos": lambda rng: wordnet_pos(),
    "wordnet_noun_lexfile": lambda rng: wordnet_noun_lexfile(),
    "word_pos": lambda rng: word_pos(),
    "word_spelling": lambda rng: word_spelling(),
    "word_language": word_language,
    "fortune_topic_es": lambda rng: fortune_topic_es(),
}
# fortune files are small: fewer examples per label there
TASK_SPLITS = {"fortune_topic_es": {"train": 100, "validation": 20, "test": 40}}
CALIBRATION = 128


# ---------------------------------------------------------------------------------------------
# splits


def split(texts_by_label: dict[str, list[str]], sizes: dict[str, int], rng: random.Random
          ) -> dict[str, list[dict[str, str]]]:
    """Balanced, disjoint splits: `sizes[split]` distinct texts per label, shuffled.

    A text that occurs under two labels is dropped from both (it would have no single answer).
    """
    seen: dict[str, set[str]] = {}
    for label, texts in texts_by_label.items():
        for t in set(texts):
            seen.setdefault(t, set()).add(label)
    out: dict[str, list[dict[str, str]]] = {s: [] for s in sizes}
    for label in sorted(texts_by_label):
        pool = sorted(t for t in set(texts_by_label[label]) if len(seen[t]) == 1)
        need = sum(sizes.values())
        if len(pool) < need:
            raise SourceMissingError(f"label {label!r} has {len(pool)} distinct texts, "
                                     f"{need} needed")
        chosen = rng.sample(pool, need)
        start = 0
        for name, n in sizes.items():
            out[name] += [{"text": t, "label": label} for t in chosen[start:start + n]]
            start += n
    for rows in out.values():
        rng.shuffle(rows)
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def build(name: str, root: Path = HERE) -> dict[str, int]:
    rng = random.Random(f"{SEED}:{name}")
    texts = TASKS[name](rng)
    splits = split(texts, TASK_SPLITS.get(name, SPLITS), rng)
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    for split_name, rows in splits.items():
        write_jsonl(directory / f"{split_name}.jsonl", rows)
    calibration = rng.sample([r["text"] for r in splits["train"]], CALIBRATION)
    write_jsonl(directory / "calibration.jsonl", [{"text": t} for t in calibration])
    (directory / "labels.json").write_text(json.dumps(sorted(texts)) + "\n")
    return {s: len(rows) for s, rows in splits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("tasks", nargs="*", metavar="TASK",
                        help=f"default: all of {', '.join(TASKS)}")
    args = parser.parse_args()
    unknown = sorted(set(args.tasks) - TASKS.keys())
    if unknown:
        parser.error(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    for name in args.tasks or list(TASKS):
        print(name, build(name))


if __name__ == "__main__":
    main()
