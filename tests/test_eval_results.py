"""Result files and the paper-style report table."""
import argparse
import csv
import json
from pathlib import Path

import pytest

from mscn.config import load_config
from mscn.errors import MscnError
from mscn.train.eval.cli import add_eval_commands
from mscn.train.eval.results import load_results, markdown_table, model_name, write_result


def _result(name, protocol, top1, fraction=1.0, dataset="imagenet"):
    return {"protocol": protocol, "name": name, "top1": top1, "top5": top1 + 10, "label_fraction": fraction,
            "dataset": dataset, "arch": "resnet50", "ckpt": f"{name}.pt", "epochs": 1}


def test_write_result_json_md_and_appended_csv(tmp_path):
    write_result(_result("SimCLR", "linear", 69.5), tmp_path / "a")
    paths = write_result(_result("SimCLR+MSCN", "linear", 71.5), tmp_path / "b")
    assert paths["csv"] == str(tmp_path / "results.csv")
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["name"] for r in rows] == ["SimCLR", "SimCLR+MSCN"] and rows[1]["top1"] == "71.50"
    assert json.loads((tmp_path / "b" / "result.json").read_text())["top1"] == 71.5
    md = (tmp_path / "b" / "result.md").read_text()
    assert "| SimCLR+MSCN | 71.5 |" in md and "Linear Evaluation" in md


def test_report_reproduces_the_papers_table_1_layout(tmp_path):
    for i, r in enumerate([_result("SimCLR", "linear", 69.5), _result("SimCLR", "finetune", 48.3, 0.01),
                           _result("SimCLR+MSCN", "linear", 71.5), _result("SimCLR+MSCN", "finetune", 54.0, 0.01)]):
        write_result(r, tmp_path / f"r{i}")
    parser = argparse.ArgumentParser()
    add_eval_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "report", str(tmp_path), "--baseline", "SimCLR", "--out", str(tmp_path / "t.md")])
    args.func(args)
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0] == "| Method | Linear Evaluation | Finetuning |"
    assert lines[2] == "| Label fraction | 100% | 1% |"
    assert lines[3] == "| SimCLR | 69.5 | 48.3 |"
    assert lines[4] == "| SimCLR+MSCN | 71.5 (+2.0) | 54.0 (+5.7) |"
    # --out a folder, or a file under a file: one line, not a traceback
    for bad, msg in ((tmp_path, "a folder; it takes the .md file"), (tmp_path / "t.md" / "x.md", "not writable")):
        args = parser.parse_args(["eval", "report", str(tmp_path), "--out", str(bad)])
        with pytest.raises(MscnError, match=f"--out .*: {msg}"):
            args.func(args)


def test_a_table_that_is_not_a_results_table_is_refused_before_the_evaluation(tmp_path):
    """--table aimed at another result's result.json, or at this one's own, appended a CSV line
    to a JSON file (``mscn eval report`` then failed on it): refused before the work, with the
    file as it was; a results table, an empty file or a new path are taken."""
    from mscn.train.eval.results import check_outputs

    paths = write_result(_result("SimCLR", "linear", 69.5), tmp_path / "a")
    before = Path(paths["json"]).read_bytes()
    for out, table in ((tmp_path / "b", paths["json"]), (tmp_path / "b", tmp_path / "b" / "result.json")):
        with pytest.raises(MscnError, match="--table .*(something else than a results table|writes that file itself)"):
            check_outputs(out, table)
    assert Path(paths["json"]).read_bytes() == before
    (tmp_path / "empty.csv").write_text("")
    for table in (paths["csv"], tmp_path / "empty.csv", tmp_path / "new.csv", None, tmp_path / "b" / "results.csv"):
        check_outputs(tmp_path / "b", table)


def test_transfer_columns_are_named_by_dataset_and_missing_cells_dashed():
    md = markdown_table([_result("BYOL", "transfer", 54.0, dataset="places205"),
                         _result("BYOL", "transfer", 47.6, dataset="inat18"),
                         _result("random init", "knn", 3.0)], metric="top5")
    assert "| Method | kNN | Transfer places205 | Transfer inat18 |" in md  # protocols in the paper's order
    assert "| BYOL | – | 64.0 | 57.6 |" in md and "| random init | 13.0 | – | – |" in md


def test_bad_report_inputs(tmp_path):
    with pytest.raises(MscnError, match="no such result"):
        load_results([str(tmp_path / "missing.json")])
    with pytest.raises(MscnError, match="no result.json"):
        load_results([str(tmp_path)])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(MscnError, match="not an mscn result"):
        load_results([str(tmp_path / "x.json")])
    (tmp_path / "x.json").write_text('{"protocol": "linear", "name": "A", "top1": "abc"}')
    with pytest.raises(MscnError, match="top1 must be a number, got 'abc'"):
        load_results([str(tmp_path / "x.json")])
    with pytest.raises(MscnError, match="--baseline"):
        markdown_table([_result("A", "linear", 1.0)], baseline="B")


def test_model_names_follow_the_paper():
    assert model_name("random", load_config()) == "random init"
    assert model_name("x.pt", load_config()) == "SimCLR+MSCN"
    assert model_name("x.pt", load_config(None, ["method.name=byol", "highpass.enabled=false"])) == "BYOL"
    no_mask = [f"views.{i}.mask.ratio=0" for i in range(4)]
    assert model_name("x.pt", load_config(None, no_mask)) == "SimCLR"


def test_report_keeps_every_distinct_setting():
    long = _result("SimCLR", "linear", 71.0) | {"epochs": 100, "time": "2024-01-01T00:00:00"}
    short = _result("SimCLR", "linear", 60.0) | {"epochs": 10, "time": "2024-01-02T00:00:00"}
    rerun = short | {"top1": 61.0, "time": "2024-01-03T00:00:00"}  # same settings: replaces `short`
    seeds = short | {"seed": 5, "top1": 62.0, "top1_std": 1.25, "time": "2024-01-04T00:00:00"}
    md = markdown_table([long, short, rerun, seeds])
    assert "| SimCLR (epochs=100, seed=-) | 71.0 |" in md
    assert "| SimCLR (epochs=10, seed=-) | 61.0 |" in md and "60.0" not in md
    assert "| SimCLR (epochs=10, seed=5) | 62.0 ± 1.2 |" in md
    # one run directory scored while it trained and when it finished: two rows, not a replacement
    early = _result("SimCLR", "linear", 40.0) | {"ckpt": "runs/r", "ckpt_step": 32, "time": "2024-01-05T00:00:00"}
    done = early | {"ckpt_step": 160, "top1": 65.0, "time": "2024-01-06T00:00:00"}
    md = markdown_table([early, done])
    assert "| SimCLR (ckpt_step=32) | 40.0 |" in md and "| SimCLR (ckpt_step=160) | 65.0 |" in md


def test_report_keeps_other_weights_settings_and_recipes_apart():
    """Results that are really different evaluations were merged as 'the same settings': one
    --ckpt name for two runs' weights, an override that changes the numbers, random inits of
    two recipes. Overrides that change only the speed do not make another row."""
    a = _result("SimCLR", "knn", 43.75) | {"ckpt": "final.pt", "ckpt_file": "/x/run1/final.pt", "time": "2024-01-01"}
    b = a | {"ckpt_file": "/x/run3/final.pt", "top1": 37.5, "time": "2024-01-02"}
    md = markdown_table([a, b])
    assert "| SimCLR (ckpt=run1/final.pt) | 43.8 |" in md and "| SimCLR (ckpt=run3/final.pt) | 37.5 |" in md
    # the digests of what was scored name a row only where nothing else tells the rows apart
    md = markdown_table([a | {"weights": "1" * 16, "val_data": "a" * 16}, b | {"weights": "2" * 16, "val_data": "b" * 16}])
    assert "| SimCLR (ckpt=run1/final.pt) | 43.8 |" in md and "| SimCLR (ckpt=run3/final.pt) | 37.5 |" in md, md
    md = markdown_table([a | {"weights": "1" * 16}, b | {"ckpt_file": a["ckpt_file"], "weights": "2" * 16}])
    assert "| SimCLR (weights=11111111) | 43.8 |" in md and "| SimCLR (weights=22222222) | 37.5 |" in md, md
    # an ablation's layout, runs/<arm>/seed0/final.pt: the last two parts of both are alike, and
    # one row hid the other without a word
    c = a | {"ckpt_file": "/x/runs/masks/seed0/final.pt", "top1": 18.75, "time": "2024-01-02"}
    d = a | {"ckpt_file": "/x/runs/highpass/seed0/final.pt", "top1": 31.25, "time": "2024-01-03"}
    md = markdown_table([c, d])
    assert "| SimCLR (ckpt=masks/seed0/final.pt) | 18.8 |" in md, md
    assert "| SimCLR (ckpt=highpass/seed0/final.pt) | 31.2 |" in md, md
    sigma = a | {"overrides": ["highpass.sigma=3"], "top1": 50.0, "time": "2024-01-03"}
    md = markdown_table([a, sigma])
    assert "43.8" in md and "50.0" in md
    fast = a | {"overrides": ["data.num_threads=8"], "top1": 43.75, "time": "2024-01-04"}
    assert markdown_table([a, fast]).count("| SimCLR") == 1  # the same evaluation, run faster
    r50 = _result("random init", "knn", 20.0) | {"ckpt": "random", "arch": "resnet50", "time": "2024-01-05"}
    r18 = r50 | {"arch": "resnet18", "config": "demo", "top1": 25.0, "time": "2024-01-06"}
    md = markdown_table([r50, r18])
    assert "20.0" in md and "25.0" in md


def test_a_second_result_in_one_folder_keeps_the_first(tmp_path):
    """An evaluation into a folder that holds a result does not overwrite it: the old one is
    kept beside it (and no longer read by the report), every time."""
    first = write_result(_result("A", "linear", 50.0), tmp_path / "ev")
    assert "previous" not in first
    second = write_result(_result("B", "linear", 60.0), tmp_path / "ev")
    third = write_result(_result("C", "linear", 70.0), tmp_path / "ev")
    kept = [json.loads(Path(p["previous"]).read_text())["name"] for p in (second, third)]
    assert kept == ["A", "B"] and Path(second["previous"]).with_suffix(".md").is_file()
    assert [r["name"] for r in load_results([str(tmp_path / "ev")])] == ["C"]
    # a hand-edited time cannot make a path of the name; both are kept
    doc = json.loads((tmp_path / "ev" / "result.json").read_text())
    (tmp_path / "ev" / "result.json").write_text(json.dumps({**doc, "time": "2026/11/27 10:00"}))
    fourth = write_result(_result("D", "linear", 80.0), tmp_path / "ev")
    assert Path(fourth["previous"]).name == "result.202611271000.json"
    assert json.loads(Path(fourth["previous"]).read_text())["name"] == "C"


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay"])
def test_eval_flags_refuse_nan(flag, capsys):
    from mscn.cli import main as mscn_main

    with pytest.raises(SystemExit) as e:
        mscn_main(["eval", "linear", "--ckpt", "random", flag, "nan"])
    assert e.value.code == 2 and "must be a finite number, got 'nan'" in capsys.readouterr().err


def test_report_columns_follow_the_paper_and_one_run_is_one_seed():
    knn = _result("SimCLR", "knn", 40.0) | {"time": "2024-01-01"}
    tr = _result("SimCLR", "transfer", 30.0) | {"dataset": "cars", "time": "2024-01-02"}
    ft10 = _result("SimCLR", "finetune", 50.0) | {"label_fraction": 0.1, "time": "2024-01-03"}
    ft1 = _result("SimCLR", "finetune", 45.0) | {"label_fraction": 0.01, "time": "2024-01-04"}
    lin = _result("SimCLR", "linear", 60.0) | {"time": "2024-01-05"}
    head = markdown_table([knn, tr, ft10, ft1, lin]).splitlines()
    assert head[0] == "| Method | Linear Evaluation | kNN | Finetuning | Finetuning | Transfer cars |"
    assert head[2] == "| Label fraction | 100% | 100% | 1% | 10% | 100% |"
    three = lin | {"seeds": 3, "top1_std": 0.5, "top1": 61.0, "time": "2024-01-06"}
    md = markdown_table([lin, three])
    assert "| SimCLR (seeds=1) | 60.0 |" in md and "| SimCLR (seeds=3) | 61.0 ± 0.5 |" in md
