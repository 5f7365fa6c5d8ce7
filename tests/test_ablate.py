"""`mscn ablate` (issue 12; paper §6.3, Fig. 5): arm expansion and validation, the
significance rule, the JSON schema, and a toy end-to-end ablation that resumes."""
import json
import shutil

import pytest
from lock_holder import held_lock

from mscn.config import load_config
from mscn.errors import MscnError
from mscn.train.ablate import report
from mscn.train.ablate.arms import BASELINE, GRIDS, Arm, expand, read_arms_file, resolve
from mscn.train.ablate.cli import main


@pytest.fixture(scope="module")
def demo():
    return load_config("demo")


def test_highpass_grid_is_masks_by_highpass_with_the_baseline_first(demo):
    arms = expand("highpass", demo)
    assert [a.name for a in arms] == [BASELINE, "masks", "highpass", "mscn"]  # baseline listed once
    cfgs = resolve(arms, "demo", [])
    masked = {n: any(v.mask.ratio > 0 for v in c.views) for n, c in cfgs.items()}
    hp = {n: c.highpass.enabled for n, c in cfgs.items()}
    assert masked == {BASELINE: False, "masks": True, "highpass": False, "mscn": True}
    assert hp == {BASELINE: False, "masks": False, "highpass": True, "mscn": True}
    assert all(v.mask.ratio == 0 for v in cfgs[BASELINE].views) and len(cfgs[BASELINE].views) == len(demo.views)


def test_grids_follow_the_recipe(demo):
    cfgs = resolve(expand("grid,views,ratio,method", demo), "demo", [])
    g0 = demo.views[0].mask.grid
    assert {c.views[-1].mask.grid for n, c in cfgs.items() if n.startswith("grid=")} == {g0 // 2, g0, g0 * 2}
    assert len(cfgs["views=2"].views) == 2 and len(cfgs["views=4"].views) == 4
    assert [v.mask.ratio for v in cfgs["ratio=0.3"].views] == [0.3] * len(demo.views)
    assert cfgs["byol"].method.name == "byol" and not cfgs["byol"].highpass.enabled
    assert cfgs["byol+mscn"].highpass.enabled and cfgs["byol+mscn"].views[0].mask.ratio > 0


def test_paper_is_every_grid_and_arm_names_are_unique(demo):
    arms = expand("paper", demo)
    assert {a.grid for a in arms} == {BASELINE, *GRIDS}
    assert len({a.name for a in arms}) == len(arms)
    resolve(arms, "demo", [])  # every arm of every grid is a valid config


def test_unknown_arm_and_bad_override_are_one_line_errors(demo, tmp_path):
    with pytest.raises(MscnError, match="unknown arm 'hipass'.*valid: highpass"):
        expand("hipass", demo)
    f = tmp_path / "arms.yaml"
    f.write_text("bad: ['views.0.mask.ratoi=0.3']\n")
    with pytest.raises(MscnError, match=r"arm 'bad' \(--arms-file\): views.0.mask.ratoi=0.3: unknown key"):
        resolve(expand("", demo, str(f)), "demo", [])
    f.write_text("big: ['views.0.mask.ratio=1.5']\n")  # a value the schema's range check rejects
    with pytest.raises(MscnError, match=r"arm 'big' \(--arms-file\): .*ratio"):
        resolve(expand("", demo, str(f)), "demo", [])
    f.write_text("typo: ['highpas.enabled=false']\n")  # named alone, not with every override of the command line
    with pytest.raises(MscnError, match=r"^arm 'typo' \(--arms-file\): highpas.enabled=false: unknown key 'highpas'"):
        resolve(expand("", demo, str(f)), "demo", ["train.knn_every_epochs=0", "schedule.epochs=1"])
    f.write_text("a/b: []\n")
    with pytest.raises(MscnError, match="names a folder"):
        expand("", demo, str(f))
    with pytest.raises(MscnError, match="no arms"):
        expand("", demo)
    for key in ("train.seed=5", "train.out_dir=x"):  # set per run by the runner: dropped silently before
        f.write_text(f"own: ['highpass.enabled=true', '{key}']\n")
        with pytest.raises(MscnError, match=rf"arm 'own': {key.split('=')[0]} is set per run by mscn ablate"):
            expand("", demo, str(f))


def test_errors_come_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    f = tmp_path / "arms.yaml"
    f.write_text("bad: ['highpass.sigmaa=2']\n")
    with pytest.raises(MscnError, match="arm 'bad'"):
        main(["--arms", "highpass", "--arms-file", str(f), "--out", str(out),
              f"data.synthetic_dir={tmp_path / 'synth'}"])
    assert not out.exists() and not (tmp_path / "synth").exists()
    (tmp_path / "afile").write_text("")  # a file as --out: refused before random init runs, not after
    with pytest.raises(MscnError, match=r"--out .*afile: a file; --out takes the ablation's folder"):
        main(["--arms", "highpass", "--out", str(tmp_path / "afile"), f"data.synthetic_dir={tmp_path / 'synth'}"])
    with pytest.raises(MscnError, match=r"--out .*not writable"):
        main(["--arms", "highpass", "--out", str(tmp_path / "afile" / "sub"), f"data.synthetic_dir={tmp_path / 'synth'}"])
    # train.out_dir on the command line was dropped without a word (the runner sets it per run)
    with pytest.raises(MscnError, match=r"train.out_dir=x: mscn ablate sets train.out_dir per run .*; pass --out"):
        main(["--arms", "highpass", "--out", str(out), "train.out_dir=x", f"data.synthetic_dir={tmp_path / 'synth'}"])
    # a pretraining run's folder as --out: random/, runs/ and the report went in beside its files
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {}\n")
    with pytest.raises(MscnError, match=r"--out .*run: a pretraining run's folder \(it holds config.yaml, checkpoints\)"):
        main(["--arms", "highpass", "--out", str(run), f"data.synthetic_dir={tmp_path / 'synth'}"])
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]
    assert not (tmp_path / "synth").exists() and not out.exists()


def test_arms_file_forms(tmp_path):
    f = tmp_path / "arms.yaml"
    f.write_text("plain: ['highpass.sigma=2.0']\nfull: {overrides: ['views.0.mask.ratio=0.3'], param: r, value: 0.3}\n")
    a, b = read_arms_file(f)
    assert a == Arm("plain", ("highpass.sigma=2.0",), "custom", "plain", "file")
    assert (b.param, b.value, b.overrides) == ("r", 0.3, ("views.0.mask.ratio=0.3",))
    # a misspelt key would run the bare recipe under the arm's name: refused, with the fix
    f.write_text("typo: {overides: ['views.0.mask.ratio=0.3'], param: r}\n")
    with pytest.raises(MscnError, match=r"arm 'typo': unknown key\(s\) 'overides' .*did you mean 'overrides'"):
        read_arms_file(f)


def test_significance_rule():
    s = report.summary
    assert s([1.0])["std"] is None and s([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert report.significance(s([50.0]), s([40.0, 41.0])) == "n=1, no error bar"
    # SE = sqrt(1/3 + 1/3) = 0.816, df = 4 (t crit 2.776): a difference of 2.0 (2.45 SE) is not
    # significant, which the old 2 SE rule called significant; 3.0 (3.67 SE) is
    a = s([10.0, 11.0, 12.0])
    assert report.significance(s([12.0, 13.0, 14.0]), a) == "not significant"
    assert report.significance(s([13.0, 14.0, 15.0]), a) == "significant"
    assert report.significance(s([8.0, 9.0, 10.0]), s([11.0, 12.0, 13.0])) == "significant"  # either sign
    assert report.significance(s([1.0, 1.0]), s([1.0, 1.0])) == "not significant"  # no spread, no difference
    assert report.significance(s([1.0, 1.0]), s([2.0, 2.0])) == "significant"


def test_welch_p_matches_scipy():
    import random

    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(300):
        xs = [rng.gauss(0, rng.uniform(0.1, 5)) for _ in range(rng.randint(2, 6))]
        ys = [rng.gauss(rng.uniform(-5, 5), rng.uniform(0.1, 5)) for _ in range(rng.randint(2, 6))]
        want = stats.ttest_ind(xs, ys, equal_var=False).pvalue
        assert report.welch_p(report.summary(xs), report.summary(ys)) == pytest.approx(want, rel=1e-9, abs=1e-12)


def _fake(lin, knn):
    return {"linear_top1": lin, "knn_top1": knn}


def test_json_schema_and_table():
    arms = [Arm(BASELINE, ("highpass.enabled=false",), "highpass", "none", BASELINE),
            Arm("mscn", (), "highpass", "masks+high-pass", "highpass")]
    results = {BASELINE: {0: _fake(20.0, 10.0), 1: _fake(22.0, 12.0)}, "mscn": {0: _fake(30.0, 25.0), 1: _fake(31.0, 27.0)}}
    doc = report.records(arms, results, {0: _fake(15.0, 9.0), 1: _fake(16.0, 8.0)}, [0, 1])
    json.dumps(doc)  # serialisable
    assert doc["schema"] == report.SCHEMA and doc["baseline"] == BASELINE and doc["seeds"] == [0, 1]
    rec = doc["arms"][1]
    assert set(rec) >= {"name", "overrides", "linear_top1", "knn_top1", "linear_top1_mean", "linear_top1_std",
                        "knn_top1_mean", "knn_top1_std", "n"}
    assert rec["linear_top1"] == [30.0, 31.0] and rec["linear_top1_mean"] == 30.5 and rec["n"] == 2
    assert rec["knn_top1_std"] == pytest.approx(2 ** 0.5)
    assert doc["random_init"] == [{"seed": 0, "linear_top1": 15.0, "knn_top1": 9.0},
                                  {"seed": 1, "linear_top1": 16.0, "knn_top1": 8.0}]
    md = report.markdown(doc)
    assert "| `mscn` | highpass | 2 | 30.5 ± 0.7 | +9.5 (significant) |" in md  # Welch: df 1.47, p = 0.032
    assert "| random init |" in md
    # one arm in its grid: no pairs; every arm against random init (15.5 ± 0.7 / 8.5 ± 0.7)
    assert doc["pairs"] == [] and "Within each grid" not in md
    v = {r["arm"]: r for r in doc["vs_random_init"]}
    assert v["mscn"]["linear_top1"] == {"diff": 15.0, "significance": "significant", "p": 0.0022}
    assert v[BASELINE]["knn_top1"]["diff"] == pytest.approx(2.5)
    assert "| `mscn` | +15.0 (significant) | +17.5 (significant) |" in md


def test_pairs_within_a_grid():
    """Every pair of a grid's arms, in grid order (b − a): the grid's own question, which the
    baseline column cannot answer (both arms can beat the baseline and not each other)."""
    arms = [Arm(BASELINE, grid=BASELINE), *(Arm(f"ratio={r}", (), "ratio", r, "ratio") for r in (0.1, 0.2, 0.3)),
            Arm("p_focal=0.4", (), "p_focal", 0.4, "focal")]
    lin = {BASELINE: [10, 11, 12], "ratio=0.1": [30, 31, 32], "ratio=0.2": [30.5, 31.5, 32.5],
           "ratio=0.3": [20, 21, 22], "p_focal=0.4": [40, 41, 42]}
    results = {a: {s: _fake(v[s], 5.0 + s) for s in range(3)} for a, v in lin.items()}
    doc = report.records(arms, results, {s: _fake(25.0 + s, 5.0) for s in range(3)}, [0, 1, 2])
    got = [(p["a"], p["b"], round(p["linear_top1"]["diff"], 3), p["linear_top1"]["significance"]) for p in doc["pairs"]]
    assert got == [("ratio=0.1", "ratio=0.2", 0.5, "not significant"), ("ratio=0.1", "ratio=0.3", -10.0, "significant"),
                   ("ratio=0.2", "ratio=0.3", -10.5, "significant")]  # the lone focal arm pairs with nothing
    assert all(p["grid"] == "ratio" and p["knn_top1"]["diff"] == 0.0 for p in doc["pairs"])
    md = report.markdown(doc)
    assert "| ratio | `ratio=0.1` → `ratio=0.3` | -10.0 (significant) | +0.0 (not significant) |" in md


def test_report_only_rewrites_the_report_of_an_older_json(tmp_path):
    arms = [Arm(BASELINE, grid=BASELINE), Arm("a", grid="g"), Arm("b", grid="g")]
    results = {n: {0: _fake(10.0 + i, 5.0), 1: _fake(11.0 + i, 6.0)} for i, n in enumerate((BASELINE, "a", "b"))}
    doc = report.records(arms, results, {0: _fake(1.0, 1.0), 1: _fake(2.0, 2.0)}, [0, 1])
    del doc["pairs"], doc["vs_random_init"]  # as written before these existed
    (tmp_path / "ablation.json").write_text(json.dumps(doc))
    assert main(["--out", str(tmp_path), "--report-only"]) == 0
    md = (tmp_path / "ablation.md").read_text()
    assert "| g | `a` → `b` | +1.0 (not significant) |" in md
    assert json.loads((tmp_path / "ablation.json").read_text())["pairs"][0]["b"] == "b"
    with pytest.raises(MscnError, match="does not exist"):
        main(["--out", str(tmp_path / "none"), "--report-only"])
    for extra in (["--arms", "ratio"], ["--seeds", "2"], ["--config", "demo"]):  # ignored without a word before
        with pytest.raises(MscnError, match="takes no --arms, --arms-file, --config, --seeds or overrides"):
            main(["--out", str(tmp_path), "--report-only", *extra])
    (tmp_path / "ablation.json").write_text("[1, 2]")
    with pytest.raises(MscnError, match="is not an ablation.json"):
        main(["--out", str(tmp_path), "--report-only"])
    for damage, match in ((lambda d: d["arms"][1].update(linear_top1=["40", 41.0]), r"arm 'a' linear_top1 must be"),
                          (lambda d: d.update(schema=99), "schema 99"),
                          (lambda d: d.update(baseline="gone"), "baseline arm 'gone'"),
                          (lambda d: d["random_init"][0].pop("knn_top1"), "random_init must be a list of entries"),
                          (lambda d: d.update(random_init=[]), "random_init must be a list of entries"),
                          (lambda d: d["arms"][1]["knn_top1"].pop(), "arm 'a' has not as many"),
                          (lambda d: d.update(seeds="abc"), "seeds must be a list of integers"),
                          (lambda d: d["arms"][1].update(linear_top1=[float("nan"), 41.0]),  # JSON's NaN
                           r"arm 'a' linear_top1 must be a list of numbers")):
        bad = json.loads(json.dumps(doc))
        damage(bad)
        (tmp_path / "ablation.json").write_text(json.dumps(bad))
        with pytest.raises(MscnError, match=match):
            main(["--out", str(tmp_path), "--report-only"])
    (tmp_path / "ablation.json").write_bytes(b"\xff\xfe")  # not text: one line, not a UnicodeDecodeError
    with pytest.raises(MscnError, match=r"cannot read .*ablation.json: 'utf-8' codec"):
        main(["--out", str(tmp_path), "--report-only"])
    # what the report derives comes from the per-seed scores: missing, null or wrong counts and
    # means (a hand edit) are recomputed, not a KeyError or TypeError
    bad = json.loads(json.dumps(doc))
    bad["arms"][1].update(n="2", linear_top1_mean=None, linear_top1_std=None)
    del bad["arms"][2]["n"], bad["arms"][2]["knn_top1_mean"], bad["arms"][2]["grid"], bad["arms"][2]["param"]
    (tmp_path / "ablation.json").write_text(json.dumps(bad))
    assert main(["--out", str(tmp_path), "--report-only"]) == 0
    fixed = {a["name"]: a for a in json.loads((tmp_path / "ablation.json").read_text())["arms"]}
    assert fixed["a"]["n"] == 2 and fixed["a"]["linear_top1_mean"] == 11.5 and fixed["b"]["knn_top1_mean"] == 5.5


TOY = ["data.synthetic_classes=2", "data.synthetic_per_class=8", "data.synthetic_val_per_class=4",
       "data.synthetic_size=[48, 40]", "data.image_size=32", "data.val_resize=36", "data.num_threads=1",
       *(f"views.{i}.mask.grid=8" for i in range(4)), "model.proj_hidden=64", "model.proj_out=32",
       "train.global_batch=8", "train.device=cpu", "schedule.epochs=1", "schedule.warmup_epochs=0",
       "eval.linear_epochs=3", "eval.linear_batch=8"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_toy_ablation_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    import mscn.train.ablate.run as run_mod

    out, f = tmp_path / "abl", tmp_path / "arms.yaml"
    # "same" resolves to the baseline's config (another spelling): it must share the baseline's run
    f.write_text("mscn: ['highpass.enabled=true']\n"
                 "same: ['highpass.enabled=false', " + ", ".join(f"'views.{i}.mask.ratio=0.0'" for i in range(4)) + "]\n")
    argv = ["--arms-file", str(f), "--seeds", "1", "--out", str(out), f"data.synthetic_dir={tmp_path / 'synth'}", *TOY]
    assert main(argv) == 0
    doc = json.loads((out / "ablation.json").read_text())
    assert [a["name"] for a in doc["arms"]] == [BASELINE, "mscn", "same"]
    assert doc["computed_runs"] == 3  # random init + 2 pretrainings; "same" reused the baseline's
    assert doc["arms"][2]["same_as"] == BASELINE and doc["arms"][2]["linear_top1"] == doc["arms"][0]["linear_top1"]
    for a in doc["arms"]:
        assert len(a["linear_top1"]) == 1 and 0 <= a["linear_top1_mean"] <= 100 and a["linear_top1_std"] is None
    summary = json.loads((out / "runs" / "mscn" / "seed0" / "result.json").read_text())["pretrain"]
    assert summary["step"] == 2  # 16 images / batch 8 x 1 epoch
    assert "n=1, no error bar" in (out / "ablation.md").read_text() and (out / "ablation.png").stat().st_size > 0
    log = capsys.readouterr().out
    assert "ETA" in log and "1/4 random seed 0" in log

    # a re-run computes nothing; nor does one whose data were staged to another path (a SLURM
    # $TMPDIR), since results count the data by what they hold, not where
    assert main(argv) == 0
    assert json.loads((out / "ablation.json").read_text())["computed_runs"] == 0
    staged = tmp_path / "staged"
    shutil.copytree(tmp_path / "synth", staged)
    moved = [*argv, f"data.root={staged / 'train'}", f"data.val_root={staged / 'val'}"]
    assert main(moved) == 0
    assert json.loads((out / "ablation.json").read_text())["computed_runs"] == 0
    synth = (str(tmp_path / "synth" / "train"), str(tmp_path / "synth" / "val"))
    assert run_mod.data_digests(str(staged / "train"), str(staged / "val")) == run_mod.data_digests(*synth)
    # other images under the same names (one re-encoded smaller, as a resized copy): other data
    image = sorted((staged / "val").rglob("*.jpg"))[0]
    from PIL import Image
    Image.open(image).resize((24, 20)).save(image)
    assert run_mod.data_digests(str(staged / "train"), str(staged / "val"))["data.val_root"] != \
        run_mod.data_digests(*synth)["data.val_root"]
    # results written before the data digests (fingerprints of the paths) count at their own
    # paths, and are not stamped with today's digest
    with monkeypatch.context() as m:
        m.setattr(run_mod, "data_digests", lambda *a: None)
        assert main(argv) == 0
    legacy = {r: json.loads(r.read_text())["fingerprint"] for r in out.rglob("seed0/result.json")}
    assert main(argv) == 0
    assert json.loads((out / "ablation.json").read_text())["computed_runs"] == 0
    assert {r: json.loads(r.read_text())["fingerprint"] for r in out.rglob("seed0/result.json")} == legacy
    for old in out.rglob("result.*.json"):  # the digest-keyed results the legacy run kept aside
        old.unlink()
    # losing one result recomputes that run only (pretraining is kept)
    (out / "runs" / "mscn" / "seed0" / "result.json").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    again = json.loads((out / "ablation.json").read_text())
    assert again["computed_runs"] == 1 and "nothing to train" in capsys.readouterr().out
    assert again["arms"][1]["linear_top1"] == doc["arms"][1]["linear_top1"]  # deterministic on the CPU

    # a folder left by another config (here: a run from before data.crop existed, cut short)
    # is set aside (as --resume none does), not resumed and not fatal; the arm starts over
    run = out / "runs" / "mscn" / "seed0"
    (run / "result.json").unlink()
    saved = run / "config.yaml"
    old_text = "".join(ln for ln in saved.read_text().splitlines(True) if not ln.strip().startswith("crop:"))
    saved.write_text(old_text)
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert f"{run} belongs to another run (differs in data.crop); its files go to superseded-" in log
    aside = list(run.glob("superseded-*/config.yaml"))
    assert len(aside) == 1 and aside[0].read_text() == old_text and (run / "result.json").is_file()
    assert "crop:" in saved.read_text()  # the new run's own config
    final = json.loads((out / "ablation.json").read_text())
    assert final["computed_runs"] == 1 and final["arms"][1]["linear_top1"] == doc["arms"][1]["linear_top1"]

    # the same, while a live run holds the arm's folder: refused in one line before the
    # "goes to superseded" message, and nothing is moved
    (run / "result.json").unlink()
    saved.write_text(old_text)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    with held_lock(run) as pid:
        capsys.readouterr()
        with pytest.raises(MscnError, match=f"in use by a live run \\(pid {pid} on test\\)"):
            main(argv)
        assert "superseded" not in capsys.readouterr().out
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_rerun_with_other_settings_keeps_every_earlier_result(tmp_path, capsys):
    """Rerun into the same --out with another evaluation setting, then another pretraining
    setting: every run's earlier result.json and the earlier report stay on disk."""
    out, f = tmp_path / "abl", tmp_path / "arms.yaml"
    f.write_text("mscn: ['highpass.enabled=true']\n")
    argv = ["--arms-file", str(f), "--seeds", "1", "--out", str(out), f"data.synthetic_dir={tmp_path / 'synth'}", *TOY]
    assert main(argv) == 0
    runs = [out / "random" / "seed0", out / "runs" / BASELINE / "seed0", out / "runs" / "mscn" / "seed0"]
    first = {r: json.loads((r / "result.json").read_text()) for r in runs}
    report = (out / "ablation.json").read_text()

    # the evaluation changes, the pretraining does not: each result is kept beside the new one
    capsys.readouterr()
    assert main([*argv, "eval.linear_epochs=2"]) == 0
    log = capsys.readouterr().out
    for r in runs:
        (kept,) = r.glob("result.*.json")
        assert json.loads(kept.read_text()) == first[r], r
        assert json.loads((r / "result.json").read_text())["fingerprint"] != first[r]["fingerprint"]
    assert log.count("the result of its earlier config kept as") == 3
    # every run scored with the new setting, the pretrained ones too (they were scored with the
    # settings saved in their checkpoint)
    assert [json.loads((r / "result.json").read_text())["eval"]["linear_epochs"] for r in runs] == [2, 2, 2]
    (old_report,) = out.glob("ablation.*.json")
    assert old_report.read_text() == report and old_report.with_suffix(".md").is_file()
    assert "held the report of another ablation" in log

    # the same rerun again finds the same: nothing more is kept
    assert main([*argv, "eval.linear_epochs=2"]) == 0
    assert len(list(out.glob("ablation.*.json"))) == 1 and len(list(runs[2].glob("result.*.json"))) == 1

    # the pretraining changes: the run's files, its result among them, go to superseded-<time>/
    second = json.loads((runs[2] / "result.json").read_text())
    assert main([*argv, "eval.linear_epochs=2", "optim.base_lr=1.0"]) == 0
    (aside,) = runs[2].glob("superseded-*/result.json")
    assert json.loads(aside.read_text()) == second
    assert len(list(out.glob("ablation.*.json"))) == 2

    # a lower train.max_steps (neutral to a resume): the arm's run went past it, so it starts
    # over, and its result is that of a run of that length (it scored the step-2 weights)
    capsys.readouterr()
    assert main([*argv, "eval.linear_epochs=2", "optim.base_lr=1.0", "train.max_steps=1"]) == 0
    assert "its run is at step 2, past this ablation's last step (1)" in capsys.readouterr().out
    assert json.loads((runs[2] / "result.json").read_text())["pretrain"]["step"] == 1
    assert len(list(runs[2].glob("superseded-*"))) == 2


def test_a_batch_larger_than_the_dataset_stops_before_the_first_run(tmp_path):
    out, f = tmp_path / "abl", tmp_path / "arms.yaml"
    f.write_text("big: ['train.global_batch=32']\n")  # 16 training images
    with pytest.raises(MscnError, match=r"arm 'big': .*16 images, fewer than one global batch of 32"):
        main(["--arms-file", str(f), "--seeds", "1", "--out", str(out),
              f"data.synthetic_dir={tmp_path / 'synth'}", *TOY])
    assert not (out / "random").exists()


def test_mscn_ablate_is_dispatched(capsys):
    from mscn.cli import main as mscn_main

    with pytest.raises(SystemExit) as e:
        mscn_main(["ablate", "--help"])
    assert e.value.code == 0 and "--arms-file" in capsys.readouterr().out
    assert mscn_main(["ablate", "--arms", "nope"]) == 2  # one-line error, exit status 2


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_an_ablation_keeps_the_blur_place_its_runs_started_with(tmp_path, capsys):
    """An ablation whose runs blurred in the loader (as data.blur_where=auto does on a GPU,
    here set explicitly on the CPU), re-run under auto on another kind of device: every arm
    keeps the loader, so no finished arm is redone, and one line says so."""
    out, f = tmp_path / "abl", tmp_path / "arms.yaml"
    f.write_text("mscn: ['highpass.enabled=true']\n")
    blur = [f"views.{i}.blur_prob=0.5" for i in range(4)]
    argv = ["--arms-file", str(f), "--seeds", "1", "--out", str(out), f"data.synthetic_dir={tmp_path / 'synth'}",
            *TOY, *blur]
    assert main([*argv, "data.blur_where=loader"]) == 0
    first = json.loads((out / "ablation.json").read_text())
    assert first["computed_runs"] == 3
    capsys.readouterr()
    assert main(argv) == 0  # data.blur_where=auto, on the CPU: pipeline for a new ablation
    again = json.loads((out / "ablation.json").read_text())
    log = capsys.readouterr().out
    assert again["computed_runs"] == 0, log
    assert "data.blur_where=auto: this ablation's runs blur in the loader (its first runs did)" in log


def test_the_fingerprint_counts_what_changes_a_result(demo):
    """A finished run is reused only for the same result: the val data it was scored on and
    where pretraining stopped count; a random init depends on no pretraining setting."""
    from mscn.train.ablate.run import fingerprint

    def fp(*overrides, random_init=False):
        return fingerprint(load_config("demo", list(overrides)), random_init=random_init)

    assert fp("data.val_root=/other/val") != fp() and fp("train.max_steps=1") != fp()
    assert fp("data.root=/other/train") != fp()  # neutral to a resume, which checks what it holds
    # given what the data hold, their paths do not count, and other data do
    held = {"data.root": "a" * 16, "data.val_root": "b" * 16}
    assert fingerprint(load_config("demo", ["data.root=/other/train"]), data=held) == \
        fingerprint(load_config("demo", []), data=held) != fingerprint(load_config("demo", []), data=None)
    assert fingerprint(load_config("demo", []), data=held) != \
        fingerprint(load_config("demo", []), data=dict(held, **{"data.val_root": "c" * 16}))
    assert fingerprint(load_config("demo", []), data=held, random_init=True) != \
        fingerprint(load_config("demo", []), data=dict(held, **{"data.root": "c" * 16}), random_init=True)
    assert fp("data.num_threads=1") == fp() and fp("train.log_every=7") == fp()  # how it runs, not what
    assert fp(random_init=True).endswith("-random") and fp(random_init=True) != fp()
    assert fp("schedule.epochs=2", "optim.base_lr=1.0", "views.0.mask.ratio=0.3", random_init=True) == fp(random_init=True)
    assert fp("eval.linear_epochs=2", random_init=True) != fp(random_init=True)
    assert fp("data.val_root=/other/val", random_init=True) != fp(random_init=True)
    assert fp("model.arch=resnet34", random_init=True) != fp(random_init=True)


def test_a_damaged_run_result_is_run_again_not_a_traceback(tmp_path):
    from mscn.train.ablate.run import load_done

    path = tmp_path / "result.json"
    for text in ("[]", '"x"', '{"fingerprint": "f"}', '{"fingerprint": "f", "linear_top1": "40", "knn_top1": 1}'):
        path.write_text(text)
        assert load_done(path, "f") is None, text
    path.write_bytes(b"\xff\xfe")
    assert load_done(path, "f") is None
    path.write_text('{"fingerprint": "f", "linear_top1": 40.0, "knn_top1": 30.5}')
    assert load_done(path, "f")["knn_top1"] == 30.5 and load_done(path, "g") is None


def test_a_stop_says_to_rerun_the_ablation(tmp_path):
    """Ctrl-C, a SIGTERM during an evaluation (which ended the process without a word), and a
    pretraining's own stop (whose line named train.out_dir) all say: rerun the same command."""
    import os
    import signal

    from mscn.train.ablate.cli import stoppable
    from mscn.train.ablate.run import Runner
    from mscn.train.preempt import Stopped

    runner = Runner(tmp_path, "t", "v", say=lambda s: None)
    runner.current = "run 3/5 (masks seed 0, in x)"
    before = signal.getsignal(signal.SIGTERM)

    def interrupted():
        raise KeyboardInterrupt

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the main thread
        raise AssertionError("not reached")

    def pretraining_stopped():
        raise Stopped("stopped by SIGTERM after step 2 of 7; ... train.out_dir=x (--resume auto)", signal.SIGTERM)

    for work, status, then in ((interrupted, 130, "else starts over"), (terminated, 143, "else starts over"),
                               (pretraining_stopped, 143, "resumes from the checkpoint")):
        with pytest.raises(Stopped) as e:
            stoppable(runner, work)
        assert e.value.status == status and "during run 3/5 (masks seed 0, in x)" in str(e.value)
        assert "rerun the same mscn ablate command to continue" in str(e.value) and then in str(e.value)
        assert "train.out_dir" not in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the ablation's only while it runs
    assert stoppable(runner, lambda: 7) == 7
