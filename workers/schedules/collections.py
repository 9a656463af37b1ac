"""A schedule's collection, resolved to concrete adapters, each pinned to a revision.

- Hub collection: `HfApi.get_collection(slug)`; its model items whose repo holds an
  `adapter_config.json` (LoRA adapters), each pinned to its current commit sha. Other items are
  listed as ignored.
- Sources: Hub ids pinned to the commit of their revision (default `main`); local directories
  pinned by content hash.
- Local directory: each subdirectory that is a PEFT adapter, pinned by content hash.

A local adapter is also copied (once per content hash) to `DATA_DIR/schedule-inputs/HASH/NAME`
and the job reads that copy: the job merges exactly the files that were hashed, even if the
directory changes while the job waits in the queue. Copies no tick has used for a week are
removed (`prune_snapshots`).

Fingerprints (`fingerprint`): a tick skips when the set it resolves has the fingerprint of the
last run whose job succeeded, so a fingerprint must name what that job merged, and only that:

- the base, and each adapter merged, at its revision;
- each adapter left out for what it is at its revision (trained on another base, DoRA or
  another variant, a config or weights that cannot be merged), at that revision: the same
  revision would be left out again, a new one is a change;
- each adapter left out because it could not be read (a local directory unreadable, the Hub
  unreachable or refusing), by origin only, marked unread: while it stays unreadable the set is
  unchanged (merging again would merge the same), and once it is read it is pinned to a
  revision, which the marker never equals, so the next tick merges it.

An adapter resolved here but found unreadable by the job's preflight (`Ticker` leaves it out)
is counted unread in the fingerprint of the job: the next tick, which resolves it to a
revision, is a change and tries it again.

An unreadable adapter is no reason to merge either: when everything a merge now would merge
was merged by the last successful run (same base, same adapters at the same revisions) and
each adapter that run merged and is missing now could not be read, the tick skips
(`ticks.only_unread_changed`) instead of pushing a merge without them, and tries them again at
the next tick. Adapters left out for good are merged neither then nor now and do not count.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from merge_service.preflight import under_roots
from merge_service.sources.cache import prune_unused
from merge_service.sources.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir
from merge_service.sources.resolve import HubOptions
from merge_service.spec import derive_task_name
from workers.schedules.models import CollectionSpec, LeftOut, PinnedAdapter, RunProblem

if TYPE_CHECKING:
    from huggingface_hub import HfApi


class CollectionError(Exception):
    """The collection itself or the base cannot be read (not found, Hub unreachable, not a
    directory)."""


@dataclass
class ResolvedCollection:
    base: str = ""  # the base the job merges onto, a Hub id pinned to its commit (`pin_base`)
    adapters: list[PinnedAdapter] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)  # found but unreadable
    ignored: list[LeftOut] = field(default_factory=list)  # not LoRA adapters

    @property
    def fingerprint(self) -> str:
        """The identity of the resolved set: the base, what was found where at which revision,
        and what could not be read."""
        return fingerprint(self.base, self.adapters, self.left_out)


def fingerprint(base: str, pinned: list[PinnedAdapter], unread: list[LeftOut]) -> str:
    """See the module's docstring. Without unread adapters, the same as before they were
    counted (the last successes recorded then still match)."""
    identity: dict[str, object] = {"base": base, "adapters": sorted(
        f"{a.origin}@{a.revision}" for a in pinned)}
    if unread:
        identity["unread"] = sorted(f"{u.origin}@{u.revision or ''}" for u in unread)
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def resolve_collection(collection: CollectionSpec, base: str, hub: HubOptions, snapshots: Path,
                       roots: list[Path] | None = None) -> ResolvedCollection:
    """`roots` (`MERGE_SERVICE_LOCAL_ROOTS`): a local adapter elsewhere, as a link in the
    collection directory may lead, is ignored, not read."""
    pinned_base = pin_base(base, hub)
    if collection.hub_collection is not None:
        resolved = _hub_collection(collection.hub_collection, hub)
    elif collection.sources is not None:
        resolved = _sources(collection.sources, hub, snapshots, roots or [])
    else:
        assert collection.directory is not None
        resolved = _directory(Path(collection.directory), snapshots, roots or [])
    _name_uniquely(resolved.adapters)
    resolved.base = pinned_base
    return resolved


def pin_base(base: str, hub: HubOptions) -> str:
    """A Hub base pinned to the commit its revision (default `main`) names now, so that a new
    commit there is a change the next tick merges, and the job merges onto the very commit the
    tick compared. A local base stays as it is: hashing gigabytes of weights every tick would
    cost more than the merge it might skip."""
    if PurePosixPath(base).is_absolute():  # else a Hub id (`ScheduleCreate`)
        return base
    from huggingface_hub import HfApi

    repo_id, _, revision = base.partition("@")
    try:
        info = HfApi(endpoint=hub.endpoint, token=hub.token).model_info(
            repo_id, revision=revision or None)
    except Exception as exc:
        raise CollectionError(f"cannot read the base model {base}: {_reason(exc)}") from None
    return f"{repo_id}@{info.sha}"


# --- the Hub ---------------------------------------------------------------------------------

def _hub_collection(slug: str, hub: HubOptions) -> ResolvedCollection:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    try:
        collection = api.get_collection(slug)
    except Exception as exc:
        raise CollectionError(f"cannot read Hub collection {slug}: {_reason(exc)}") from None
    found = ResolvedCollection()
    for item in collection.items:
        if item.item_type != "model":
            found.ignored.append(LeftOut(origin=item.item_id,
                                         reason=f"a {item.item_type}, not a model"))
            continue
        _pin_hub_repo(api, item.item_id, None, found, require_adapter=True)
    return found


def _pin_hub_repo(api: HfApi, repo_id: str, revision: str | None, found: ResolvedCollection,
                  *, require_adapter: bool) -> None:
    try:
        info = api.model_info(repo_id, revision=revision)
    except Exception as exc:
        found.left_out.append(LeftOut(origin=repo_id, revision=revision, transient=True,
                                      reason=f"cannot read Hub repo {repo_id}: {_reason(exc)}"))
        return
    files = {s.rfilename for s in info.siblings or []}
    if require_adapter and "adapter_config.json" not in files:
        found.ignored.append(LeftOut(origin=repo_id, revision=info.sha,
                                     reason="not a LoRA adapter (no adapter_config.json)"))
        return
    found.adapters.append(PinnedAdapter(name=derive_task_name(repo_id), origin=repo_id,
                                        revision=info.sha, source=f"{repo_id}@{info.sha}"))


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- local directories -----------------------------------------------------------------------

def _sources(sources: list[str], hub: HubOptions, snapshots: Path, roots: list[Path]
             ) -> ResolvedCollection:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    found = ResolvedCollection()
    for source in sources:
        if PurePosixPath(source).is_absolute():  # else a Hub id (`CollectionSpec`)
            _pin_local(Path(source), snapshots, found, roots)
        else:
            repo_id, _, revision = source.partition("@")
            _pin_hub_repo(api, repo_id, revision or None, found, require_adapter=False)
    return found


def _directory(directory: Path, snapshots: Path, roots: list[Path]) -> ResolvedCollection:
    if not directory.is_dir():
        raise CollectionError(f"the collection directory {directory} does not exist or is not "
                              "a directory")
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise CollectionError(f"cannot list the collection directory {directory}: "
                              f"{exc.strerror or exc}") from None
    found = ResolvedCollection()
    for entry in entries:
        if entry.name.startswith(".") or _outside(entry, roots, found):
            continue
        if not entry.is_dir() or not is_adapter_dir(entry):
            found.ignored.append(LeftOut(origin=str(entry),
                                         reason="not a LoRA adapter directory (no "
                                         "adapter_config.json)"))
            continue
        _pin_local(entry, snapshots, found, roots)
    return found


def _outside(path: Path, roots: list[Path], found: ResolvedCollection) -> bool:
    """A local adapter outside `roots` (links followed) is listed as ignored, and not read."""
    if not roots:
        return False
    resolved = path.expanduser().resolve()
    if under_roots(resolved, roots):
        return False
    found.ignored.append(LeftOut(origin=str(resolved), reason="outside the directories this "
                                 "service may use (MERGE_SERVICE_LOCAL_ROOTS)"))
    return True


def _pin_local(path: Path, snapshots: Path, found: ResolvedCollection, roots: list[Path]
               ) -> None:
    if _outside(path, roots, found):
        return
    path = path.expanduser().resolve()
    name = path.name
    try:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory")
        revision = content_hash(path)
        copy = snapshot(path, revision, snapshots)
    except OSError as exc:
        found.left_out.append(LeftOut(name=name, origin=str(path), transient=True,
                                      reason=f"cannot read {path}: {exc.strerror or exc}",
                                      problems=[RunProblem(message=str(exc), model=name)]))
        return
    found.adapters.append(PinnedAdapter(name=name, origin=str(path), revision=revision,
                                        source=str(copy)))


def content_hash(directory: Path) -> str:
    """sha256 over the files of `directory` a merge reads (`_files`: relative path and bytes),
    in path order."""
    digest = hashlib.sha256()
    for file in sorted(_files(directory)):
        relative = file.relative_to(directory).as_posix()
        digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    """Of a PEFT adapter, the files a merge reads (`merge_service.sources.lora`): peft's model
    card, a trainer's `checkpoint-N/` and `training_args.bin`, tokenizer files beside them are
    no change to merge again, nor worth a copy. Of another directory (a full checkpoint among
    `sources`), every regular file; hidden files (`.git`, editor swap files) never."""
    if is_adapter_dir(directory):
        return [directory / name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
                if (directory / name).is_file()]
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root) / n for n in names if not n.startswith(".")
                  and (Path(root) / n).is_file()]
    return files


def snapshot(directory: Path, revision: str, snapshots: Path) -> Path:
    """`snapshots/REVISION/NAME`, a copy of the files of `directory` that were hashed, made
    once (atomically: copied beside, then renamed). The copy is checked against the hash, so a
    directory that changed while it was copied is not pinned under the wrong revision."""
    target = snapshots / revision / directory.name
    if target.is_dir():
        os.utime(target.parent)  # in use: kept by `prune_snapshots` for another while
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{directory.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir()
        for file in _files(directory):
            copy = partial / file.relative_to(directory)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, copy)
        if content_hash(partial) != revision:
            raise OSError(f"{directory} changed while it was being read; it is read again at "
                          "the next run")
        try:
            partial.rename(target)
        except OSError:
            if not target.is_dir():  # else: a concurrent run made the same copy first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def prune_snapshots(snapshots: Path, keep_s: float) -> list[Path]:
    """Remove the snapshots no tick has used for `keep_s` seconds (a job that is retried
    within that time still finds its inputs); returns what was removed."""
    return prune_unused(snapshots.iterdir(), keep_s) if snapshots.is_dir() else []


def _name_uniquely(adapters: list[PinnedAdapter]) -> None:
    """Task names must be distinct in a job: `name`, `name-2`, ... in order."""
    taken: set[str] = set()
    for i, adapter in enumerate(adapters):
        candidate, n = adapter.name, 2
        while candidate in taken:
            candidate, n = f"{adapter.name}-{n}", n + 1
        taken.add(candidate)
        if candidate != adapter.name:
            adapters[i] = adapter.model_copy(update={"name": candidate})
