"""Offline tasks: item counts, Hub-schema conversion, identical requests to lm-eval's own tasks, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fbnprune.errors import UserError
from fbnprune.evaluate import tasks as T

EXPECTED_ITEMS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "winogrande": 1267,
                  "openbookqa": 500, "copa": 100, "copa_balanced": 1000, "sciq": 1000}


@pytest.mark.parametrize("name", sorted(EXPECTED_ITEMS))
def test_item_counts(data_root, name):
    assert len(T.read_docs(name, data_root)) == EXPECTED_ITEMS[name]


def test_blimp_subset_is_fixed_and_sized(data_root):
    assert len(T.blimp_paradigms()) == 67
    a = T.read_docs("blimp_adjunct_island", data_root, blimp_per_paradigm=50)
    b = T.read_docs("blimp_adjunct_island", data_root, blimp_per_paradigm=50)
    assert len(a) == 50 and a == b
    assert len(T.read_docs("blimp_adjunct_island", data_root, blimp_per_paradigm=None)) == 1000
    assert a != T.read_docs("blimp_adjunct_island", data_root, blimp_per_paradigm=None)[:50]  # a sample, not a head


def test_docs_use_the_hub_schema(data_root):
    """Spot checks against the records as the Hub datasets of the standard tasks store them."""
    piqa = T.read_docs("piqa", data_root)[0]
    assert piqa["goal"] == "How do I ready a guinea pig cage for it's new occupants?" and piqa["label"] == 0
    arc = T.read_docs("arc_easy", data_root)[0]
    assert arc["id"] == "Mercury_417466" and arc["answerKey"] == "A"
    assert arc["question"].startswith("Which statement best explains why photosynthesis")
    assert arc["choices"]["label"] == ["A", "B", "C", "D"] and len(arc["choices"]["text"]) == 4
    numeric = [d for d in T.read_docs("arc_easy", data_root) if d["answerKey"].isdigit()]
    assert len(numeric) == 97 and all(d["choices"]["label"][0] == "1" for d in numeric)
    obqa = T.read_docs("openbookqa", data_root)[0]
    assert obqa["id"] == "8-343" and obqa["answerKey"] == "B" and obqa["question_stem"].startswith("A person wants")
    boolq = T.read_docs("boolq", data_root)
    assert sum(d["label"] for d in boolq) == 2033  # answer true -> label 1 ("yes")
    copa = T.read_docs("copa", data_root)
    assert [d["idx"] for d in copa] == list(range(401, 501))
    assert {d["question"] for d in copa} == {"cause", "effect"} and {d["label"] for d in copa} == {0, 1}
    wg = T.read_docs("winogrande", data_root)[0]
    assert wg["option1"] == "Sarah" and wg["answer"] == "2"
    sciq = T.read_docs("sciq", data_root)
    assert sum(1 for d in sciq if d["support"]) == 884


def _offline_task(name: str, tmp_path: Path, per_paradigm: int | None = 20):
    from lm_eval.tasks import TaskManager, get_task_dict

    prep = T.prepare_offline_tasks([name], blimp_per_paradigm=per_paradigm, out_dir=tmp_path)
    tm = TaskManager(include_path=str(prep.include_path), include_defaults=False)
    return get_task_dict([name], tm)[name]


def _standard_task_on_docs(name: str, docs: list[dict]):
    """lm-eval's own task config for ``name`` (its bundled YAML), with only the dataset download replaced."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    if name.startswith("blimp_"):
        std, split = T.lm_eval_tasks_dir() / "blimp" / f"{name[6:]}.yaml", "train"
    else:
        spec = T.OFFLINE_TASKS[name]
        std, split = T.lm_eval_tasks_dir() / spec.std_yaml, spec.split
    cfg = load_yaml(std)
    cfg.pop("tag", None)
    # only the splits change (no training/few-shot split exists locally); prompts, choices and metrics are untouched
    cfg.update(training_split=None, fewshot_split=None, validation_split=split if split != "test" else None,
               test_split=split if split == "test" else None)

    class LocalDocs(ConfigurableTask):
        def download(self, dataset_kwargs=None, **kwargs):  # no Hub: the same docs the offline task reads
            self.dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})

    return LocalDocs(config=cfg)


def _requests(task, n: int):
    task.build_all_requests(limit=n, rank=0, world_size=1)
    return [(i.doc_id, i.idx, i.arguments) for i in task.instances]


@pytest.mark.parametrize("name", ["piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa", "copa",
                                  "sciq", "blimp_adjunct_island", "blimp_wh_vs_that_with_gap"])
def test_offline_requests_equal_lm_eval_standard_task(data_root, tmp_path, name):
    """For a handful of items the offline task builds exactly the requests lm-eval's own task builds."""
    off = _offline_task(name, tmp_path)
    docs = T.read_docs(name, data_root, blimp_per_paradigm=20)
    std = _standard_task_on_docs(name, docs)
    got, want = _requests(off, 6), _requests(std, 6)
    assert len(got) >= 12 and got == want
    # targets (gold indices) agree too
    for d_off, d_std in zip(list(off.eval_docs)[:6], list(std.eval_docs)[:6], strict=True):
        assert off.doc_to_target(d_off) == std.doc_to_target(d_std)


def test_known_prompts(data_root, tmp_path):
    """Literal prompts of the standard tasks (copa connector, winogrande partial scoring, sciq support, blimp)."""
    copa = _requests(_offline_task("copa", tmp_path / "c"), 1)
    assert copa[0][2] == ("The man turned on the faucet therefore", "  water flowed from the spout.")
    wg = _requests(_offline_task("winogrande", tmp_path / "w"), 1)
    assert [r[2] for r in wg] == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                                  ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    sciq = _requests(_offline_task("sciq", tmp_path / "s"), 1)
    assert sciq[0][2][0].startswith("Oxidants and Reductants") and sciq[0][2][0].endswith("\nAnswer:")
    assert sciq[3][2][1] == " oxidants"  # correct answer is the 4th choice
    bl = _requests(_offline_task("blimp_adjunct_island", tmp_path / "b"), 1)
    assert bl[0][2][0] == "" and bl[1][2][0] == ""


# ----------------------------------------------------------------------------------------------- errors
def _copy_data(src: Path, dst: Path, *folders: str) -> Path:
    for f in folders:
        shutil.copytree(src / f, dst / f)
    return dst


def test_missing_data_file_names_the_file(data_root, tmp_path):
    root = _copy_data(data_root, tmp_path, "piqa")
    (root / "piqa" / "valid-labels.lst").unlink()
    with pytest.raises(UserError, match=r"piqa.*valid-labels\.lst"):
        T.read_docs("piqa", root)


def test_no_data_directory_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FBNPRUNE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="boolq.*data directory"):
        T.read_docs("boolq")


def test_unparsable_data_names_task_file_and_line(data_root, tmp_path):
    root = _copy_data(data_root, tmp_path, "boolq", "sciq", "copa", "arc")
    lines = (root / "boolq/dev.jsonl").read_text().splitlines()
    lines[6] = lines[6][:-5]
    (root / "boolq/dev.jsonl").write_text("\n".join(lines))
    with pytest.raises(UserError, match=r"'boolq'.*dev\.jsonl:7: not valid JSON"):
        T.read_docs("boolq", root)
    (root / "sciq/test.json").write_text("[{\"question\": 1}")
    with pytest.raises(UserError, match=r"'sciq'.*test\.json"):
        T.read_docs("sciq", root)
    (root / "copa/balanced-copa-dev-all.xml").write_text("<copa><item id='1'>")
    with pytest.raises(UserError, match=r"'copa'.*xml: not valid XML"):
        T.read_docs("copa", root)
    rec = json.loads((root / "arc/ARC-Easy-Test.jsonl").read_text().splitlines()[0])
    rec["answerKey"] = "Z"
    (root / "arc/ARC-Easy-Test.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(UserError, match=r"'arc_easy'.*record 1: answerKey 'Z'"):
        T.read_docs("arc_easy", root)


def test_unknown_offline_name():
    assert not T.is_offline_task("piqaa")
    with pytest.raises(UserError, match="'piqaa' is not an offline task"):
        T.read_docs("piqaa")


def test_seeded_subset_is_fixed_representative_and_recorded(tmp_path):
    from fbnprune.evaluate.tasks import prepare_offline_tasks, read_docs, seeded_subset

    docs = [{"i": i} for i in range(50)]
    a, b = seeded_subset(docs, 10, 0), seeded_subset(docs, 10, 0)
    assert a == b and len(a) == 10 and a != docs[:10]  # not lm-eval's "first N"
    assert [d["i"] for d in a] == sorted(d["i"] for d in a)
    assert seeded_subset(docs, 10, 1) != a and seeded_subset(docs, None, 0) == docs
    prep = prepare_offline_tasks(["copa"], subset=30, subset_seed=0, out_dir=tmp_path)
    assert prep.info["copa"]["items"] == 30 and prep.info["copa"]["subset"] == {"items": 30, "of": 100, "seed": 0}
    lines = (tmp_path / "copa.jsonl").read_text().splitlines()
    full = read_docs("copa")
    assert len(lines) == 30 and [json.loads(x) for x in lines] == seeded_subset(full, 30, 0)
