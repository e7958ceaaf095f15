"""Offline lm-eval tasks built from the local data directory (``../shared/data``).

Why: the standard lm-eval tasks download their data from the Hugging Face Hub, which many machines cannot reach.
Here each local file is converted into the *same record schema* as the Hub dataset the standard task reads, and a
task YAML is generated at run time that ``include``-s lm-eval's own bundled YAML for that task and overrides only
where the data comes from (``dataset_path: json`` + ``data_files``). Prompts, choices, targets, metrics and any
preprocessing functions therefore come from lm-eval itself and cannot drift from the standard task.

Generated files live in the cache (``<cache>/lm_eval_tasks/<key>/``), never in the repository. The key hashes the
source files' sizes and modification times, the blimp subset and this module's format version, so a changed data
file or setting produces a fresh directory.

Task names (same as lm-eval): piqa, arc_easy, arc_challenge, boolq, winogrande, openbookqa, copa, sciq, blimp
(the group of 67 ``blimp_<paradigm>`` tasks, each also usable alone). Extra: ``copa_balanced`` (all 1000 items of
the Balanced-COPA dev set; the standard ``copa`` is its ids 401-500, the SuperGLUE validation split).
"""

from __future__ import annotations

import hashlib
import json
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fbnprune.errors import UserError
from fbnprune.paths import cache_dir, data_dir

FORMAT_VERSION = 1
DEFAULT_BLIMP_PER_PARADIGM = 100  # fixed subset per paradigm file (of 1000); None = all items
BLIMP_SUBSET_SEED = 0


def lm_eval_tasks_dir() -> Path:
    """Directory of lm-eval's bundled task YAMLs (the standard prompts we include)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


# ----------------------------------------------------------------------------------------------- readers
def _open_text(path: Path, task: str) -> str:
    if not path.is_file():
        raise UserError(f"task {task!r}: data file is missing: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"task {task!r}: cannot read {path}: {e}") from e


def _jsonl(path: Path, task: str) -> list[dict[str, Any]]:
    out = []
    for i, ln in enumerate(_open_text(path, task).splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            raise UserError(f"task {task!r}: {path}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise UserError(f"task {task!r}: {path}:{i}: expected a JSON object")
        out.append(rec)
    if not out:
        raise UserError(f"task {task!r}: {path} holds no records")
    return out


def _labels(path: Path, task: str, n: int) -> list[int]:
    lines = [ln.strip() for ln in _open_text(path, task).splitlines() if ln.strip()]
    if len(lines) != n:
        raise UserError(f"task {task!r}: {path} has {len(lines)} labels for {n} items")
    try:
        return [int(x) for x in lines]
    except ValueError as e:
        raise UserError(f"task {task!r}: {path}: labels must be integers ({e})") from e


class _Field:
    """Access record fields with an error that names the task, file and record."""

    def __init__(self, task: str, path: Path) -> None:
        self.task, self.path = task, path

    def __call__(self, rec: dict[str, Any], key: str, i: int) -> Any:
        try:
            return rec[key]
        except (KeyError, TypeError):
            raise UserError(f"task {self.task!r}: {self.path}: record {i + 1} has no field {key!r}") from None

    def fail(self, i: int, msg: str) -> UserError:
        return UserError(f"task {self.task!r}: {self.path}: record {i + 1}: {msg}")


def _read_piqa(root: Path, task: str) -> list[dict[str, Any]]:
    path = root / "piqa/valid.jsonl"
    recs, f = _jsonl(path, task), _Field(task, path)
    labels = _labels(root / "piqa/valid-labels.lst", task, len(recs))
    return [{"goal": f(r, "goal", i), "sol1": f(r, "sol1", i), "sol2": f(r, "sol2", i), "label": labels[i]}
            for i, r in enumerate(recs)]


def _arc_like(path: Path, task: str, stem_key: str) -> list[dict[str, Any]]:
    """ARC / OpenBookQA original layout -> Hub layout (question text, choices {text, label}, answerKey)."""
    recs, f = _jsonl(path, task), _Field(task, path)
    out = []
    for i, r in enumerate(recs):
        q = f(r, "question", i)
        if not isinstance(q, dict) or "stem" not in q or "choices" not in q:
            raise f.fail(i, "field 'question' must hold 'stem' and 'choices'")
        try:
            texts = [c["text"] for c in q["choices"]]
            labels = [c["label"] for c in q["choices"]]
        except (KeyError, TypeError):
            raise f.fail(i, "every choice needs 'text' and 'label'") from None
        key = f(r, "answerKey", i)
        if str(key).strip() not in labels:
            raise f.fail(i, f"answerKey {key!r} is not one of the choice labels {labels}")
        out.append({"id": f(r, "id", i), stem_key: q["stem"], "choices": {"text": texts, "label": labels},
                    "answerKey": key})
    return out


def _read_arc_easy(root: Path, task: str) -> list[dict[str, Any]]:
    return _arc_like(root / "arc/ARC-Easy-Test.jsonl", task, "question")


def _read_arc_challenge(root: Path, task: str) -> list[dict[str, Any]]:
    return _arc_like(root / "arc/ARC-Challenge-Test.jsonl", task, "question")


def _read_openbookqa(root: Path, task: str) -> list[dict[str, Any]]:
    return _arc_like(root / "openbookqa/test.jsonl", task, "question_stem")


def _read_boolq(root: Path, task: str) -> list[dict[str, Any]]:
    path = root / "boolq/dev.jsonl"
    recs, f = _jsonl(path, task), _Field(task, path)
    out = []
    for i, r in enumerate(recs):
        ans = f(r, "answer", i)
        if not isinstance(ans, bool):
            raise f.fail(i, f"field 'answer' must be true/false, got {ans!r}")
        out.append({"question": f(r, "question", i), "passage": f(r, "passage", i), "idx": i, "label": int(ans)})
    return out


def _read_winogrande(root: Path, task: str) -> list[dict[str, Any]]:
    path = root / "winogrande/dev.jsonl"
    recs, f = _jsonl(path, task), _Field(task, path)
    out = []
    for i, r in enumerate(recs):
        s, ans = f(r, "sentence", i), str(f(r, "answer", i))
        if "_" not in s or ans not in ("1", "2"):
            raise f.fail(i, "needs a '_' blank in 'sentence' and answer '1' or '2'")
        out.append({"sentence": s, "option1": f(r, "option1", i), "option2": f(r, "option2", i), "answer": ans})
    return out


def _copa_items(root: Path, task: str) -> list[tuple[int, dict[str, Any]]]:
    path = root / "copa/balanced-copa-dev-all.xml"
    try:
        tree = ET.fromstring(_open_text(path, task))
    except ET.ParseError as e:
        raise UserError(f"task {task!r}: {path}: not valid XML ({e})") from e
    out = []
    for i, item in enumerate(tree.iter("item")):
        try:
            iid, asks, alt = int(item.attrib["id"]), item.attrib["asks-for"], int(item.attrib["most-plausible-alternative"])
            p, a1, a2 = (item.find(t).text.strip() for t in ("p", "a1", "a2"))  # type: ignore[union-attr]
        except (KeyError, ValueError, AttributeError):
            raise UserError(f"task {task!r}: {path}: <item> number {i + 1} lacks id/asks-for/"
                            "most-plausible-alternative or p/a1/a2") from None
        if asks not in ("cause", "effect") or alt not in (1, 2):
            raise UserError(f"task {task!r}: {path}: item id={iid}: bad asks-for {asks!r} or alternative {alt}")
        out.append((iid, {"premise": p, "choice1": a1, "choice2": a2, "question": asks, "idx": iid, "label": alt - 1}))
    if not out:
        raise UserError(f"task {task!r}: {path} holds no <item> elements")
    return out


def _read_copa(root: Path, task: str) -> list[dict[str, Any]]:
    """SuperGLUE COPA validation = ids 401-500 of the Balanced-COPA dev file (see data README)."""
    docs = [d for iid, d in _copa_items(root, task) if 401 <= iid <= 500]
    if len(docs) != 100:
        raise UserError(f"task {task!r}: expected the 100 SuperGLUE validation items (ids 401-500), found {len(docs)}")
    return sorted(docs, key=lambda d: d["idx"])


def _read_copa_balanced(root: Path, task: str) -> list[dict[str, Any]]:
    return [d for _, d in _copa_items(root, task)]


def _read_sciq(root: Path, task: str) -> list[dict[str, Any]]:
    path = root / "sciq/test.json"
    try:
        recs = json.loads(_open_text(path, task))
    except json.JSONDecodeError as e:
        raise UserError(f"task {task!r}: {path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(recs, list) or not recs:
        raise UserError(f"task {task!r}: {path}: expected a non-empty JSON array")
    f = _Field(task, path)
    keys = ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support")
    return [{k: f(r, k, i) for k in keys} for i, r in enumerate(recs)]


def blimp_paradigms(root: Path | None = None) -> list[str]:
    """The 67 paradigm names, as lm-eval spells them (from its bundled ``blimp_*.yaml`` files)."""
    names = sorted(p.stem for p in (lm_eval_tasks_dir() / "blimp").glob("*.yaml") if not p.stem.startswith("_"))
    return names


def _read_blimp_paradigm(root: Path, task: str, paradigm: str, per_paradigm: int | None) -> list[dict[str, Any]]:
    path = root / "blimp" / f"{paradigm}.jsonl"
    recs, f = _jsonl(path, task), _Field(task, path)
    for i, r in enumerate(recs):
        f(r, "sentence_good", i), f(r, "sentence_bad", i)
    if per_paradigm is not None and per_paradigm < len(recs):
        idx = sorted(random.Random(f"{BLIMP_SUBSET_SEED}:{paradigm}").sample(range(len(recs)), per_paradigm))
        recs = [recs[i] for i in idx]
    return recs


# ----------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class OfflineTask:
    """One offline task: the standard lm-eval YAML it mirrors, its eval split and how to read the local files."""

    name: str
    std_yaml: str  # relative to lm_eval/tasks
    split: str  # split name the standard task evaluates on
    files: tuple[str, ...]  # relative to the data directory
    read: Callable[[Path, str], list[dict[str, Any]]]
    std_name: str | None = None  # lm-eval task this mirrors, when the names differ


OFFLINE_TASKS: dict[str, OfflineTask] = {t.name: t for t in (
    OfflineTask("piqa", "piqa/piqa.yaml", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _read_piqa),
    OfflineTask("arc_easy", "arc/arc_easy.yaml", "test", ("arc/ARC-Easy-Test.jsonl",), _read_arc_easy),
    OfflineTask("arc_challenge", "arc/arc_challenge.yaml", "test", ("arc/ARC-Challenge-Test.jsonl",),
                _read_arc_challenge),
    OfflineTask("boolq", "super_glue/boolq/default.yaml", "validation", ("boolq/dev.jsonl",), _read_boolq),
    OfflineTask("winogrande", "winogrande/default.yaml", "validation", ("winogrande/dev.jsonl",), _read_winogrande),
    OfflineTask("openbookqa", "openbookqa/openbookqa.yaml", "test", ("openbookqa/test.jsonl",), _read_openbookqa),
    OfflineTask("copa", "super_glue/copa/default.yaml", "validation", ("copa/balanced-copa-dev-all.xml",),
                _read_copa),
    OfflineTask("copa_balanced", "super_glue/copa/default.yaml", "validation", ("copa/balanced-copa-dev-all.xml",),
                _read_copa_balanced, std_name="copa"),
    OfflineTask("sciq", "sciq/sciq.yaml", "test", ("sciq/test.json",), _read_sciq),
)}
BLIMP_GROUP = "blimp"


def offline_task_names() -> list[str]:
    """Every task name the offline set answers to (groups first, then single tasks)."""
    return [*OFFLINE_TASKS, BLIMP_GROUP, *(f"blimp_{p}" for p in blimp_paradigms())]


def is_offline_task(name: str) -> bool:
    return name in OFFLINE_TASKS or name == BLIMP_GROUP or (
        name.startswith("blimp_") and name[len("blimp_"):] in set(blimp_paradigms()))


def read_docs(name: str, root: Path | None = None, *, blimp_per_paradigm: int | None = DEFAULT_BLIMP_PER_PARADIGM
              ) -> list[dict[str, Any]]:
    """The local docs of one offline (non-group) task, in the Hub record schema of the standard task."""
    root = _root(root, name)
    if name in OFFLINE_TASKS:
        return OFFLINE_TASKS[name].read(root, name)
    if name.startswith("blimp_") and is_offline_task(name):
        return _read_blimp_paradigm(root, name, name[len("blimp_"):], blimp_per_paradigm)
    raise UserError(f"{name!r} is not an offline task; offline tasks: {', '.join(OFFLINE_TASKS)}, blimp, blimp_<paradigm>")


def _root(root: Path | None, task: str) -> Path:
    r = root if root is not None else data_dir()
    if r is None:
        raise UserError(f"task {task!r} needs the data directory (../shared/data or $FBNPRUNE_DATA), which was not found")
    return Path(r)


# ----------------------------------------------------------------------------------------------- YAML generation
def _source_fingerprint(root: Path, rels: list[str]) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{root}".encode())
    for rel in rels:
        p = root / rel
        st = p.stat() if p.exists() else None
        h.update(f"{rel}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}|".encode())
    return h.hexdigest()[:16]


def _write_jsonl(path: Path, docs: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _task_yaml(name: str, std_yaml: Path, split: str, data_file: Path, extra: dict[str, Any] | None = None) -> dict:
    cfg: dict[str, Any] = {
        "include": str(std_yaml),
        "task": name,
        "tag": [],  # the standard tags (ai2_arc, super-glue-lm-eval-v1) would pull in Hub tasks
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
    }
    cfg.update(extra or {})
    return cfg


@dataclass
class PreparedTasks:
    """Where the generated YAMLs are and which lm-eval names to request."""

    include_path: Path
    task_names: list[str]  # names to pass to lm-eval (offline versions)
    info: dict[str, Any]  # per task: files, items, subset


def seeded_subset(docs: list[dict[str, Any]], items: int | None, seed: int) -> list[dict[str, Any]]:
    """A fixed random subset of ``items`` docs (in their original order); all docs when ``items`` is None or larger.

    Unlike lm-eval's ``limit`` (the first N items, often sorted by source), a seeded subset is representative and
    is the same for every model and method, which is what a leaderboard needs.
    """
    if items is None or items >= len(docs):
        return docs
    import random

    idx = sorted(random.Random(seed).sample(range(len(docs)), items))
    return [docs[i] for i in idx]


def prepare_offline_tasks(names: list[str], *, root: Path | None = None,
                          blimp_per_paradigm: int | None = DEFAULT_BLIMP_PER_PARADIGM,
                          out_dir: Path | None = None, subset: int | None = None,
                          subset_seed: int = 0) -> PreparedTasks:
    """Convert the data of ``names`` (offline task names) and write their YAMLs; returns the include path.

    The standard task YAML is ``include``-d by absolute path, so the prompt is lm-eval's own. ``subset`` keeps a
    fixed seeded subset of that many items of each non-blimp task (see :func:`seeded_subset`).
    """
    if subset is not None and subset <= 0:
        raise UserError(f"subset must be a positive number of items, got {subset}")
    if not names:
        raise UserError("no tasks given")
    unknown = [n for n in names if not is_offline_task(n)]
    if unknown:
        raise UserError(f"not offline tasks: {unknown}")
    root = _root(root, names[0])
    std = lm_eval_tasks_dir()
    paradigms = blimp_paradigms()
    # expand the group into its paradigms, keep order, drop duplicates
    singles: list[str] = []
    for n in names:
        for s in ([f"blimp_{p}" for p in paradigms] if n == BLIMP_GROUP else [n]):
            if s not in singles:
                singles.append(s)
    rels = sorted({f for s in singles for f in (OFFLINE_TASKS[s].files if s in OFFLINE_TASKS
                                                 else (f"blimp/{s[len('blimp_'):]}.jsonl",))})
    key = _source_fingerprint(root, rels) + f"-b{blimp_per_paradigm}" + (f"-s{subset}.{subset_seed}" if subset else "")
    base = out_dir if out_dir is not None else cache_dir() / "lm_eval_tasks" / key
    base.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    for s in singles:
        docs = read_docs(s, root, blimp_per_paradigm=blimp_per_paradigm)
        n_all = len(docs)
        if s in OFFLINE_TASKS:
            docs = seeded_subset(docs, subset, subset_seed)
        data_file = base / f"{s}.jsonl"
        _write_jsonl(data_file, docs)
        if s in OFFLINE_TASKS:
            spec = OFFLINE_TASKS[s]
            cfg = _task_yaml(s, std / spec.std_yaml, spec.split, data_file)
            info[s] = {"files": [str(root / f) for f in spec.files], "items": len(docs),
                       "mirrors": f"lm_eval/tasks/{spec.std_yaml}"}
            if len(docs) < n_all:
                info[s]["subset"] = {"items": len(docs), "of": n_all, "seed": subset_seed}
        else:
            par = s[len("blimp_"):]
            cfg = _task_yaml(s, std / "blimp" / f"{par}.yaml", "train", data_file,
                             {"validation_split": "train", "test_split": None})
            info[s] = {"files": [str(root / "blimp" / f"{par}.jsonl")], "items": len(docs),
                       "subset": None if blimp_per_paradigm is None else
                       {"per_paradigm": blimp_per_paradigm, "seed": BLIMP_SUBSET_SEED},
                       "mirrors": f"lm_eval/tasks/blimp/{par}.yaml"}
        (base / f"{s}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if BLIMP_GROUP in names:
        group = yaml.safe_load((std / "blimp" / "_blimp.yaml").read_text())
        group["task"] = [f"blimp_{p}" for p in paradigms]
        (base / "_blimp.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return PreparedTasks(include_path=base, task_names=list(dict.fromkeys(names)), info=info)
