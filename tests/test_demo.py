"""`mscn demo` end to end at toy size: synthesize -> pretrain -> probes -> table."""
import json

import pytest

from mscn.train.demo import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TOY = ["data.synthetic_classes=3", "data.synthetic_per_class=8", "data.synthetic_val_per_class=4",
       "data.synthetic_size=[64, 48]", "data.image_size=32", "data.val_resize=36", "data.num_threads=1",
       *(f"views.{i}.mask.grid=8" for i in range(4)), "model.proj_hidden=64", "model.proj_out=32",
       "train.global_batch=8", "train.device=cpu", "schedule.epochs=2", "train.knn_every_epochs=1",
       "eval.linear_epochs=3", "eval.linear_batch=8"]


def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "synth"
    assert main(["--out", str(out), "--data", str(data), *TOY]) == 0
    res = json.loads((out / "demo_results.json").read_text())
    names = [r["encoder"] for r in res["rows"]]
    assert names == ["SimCLR + MSCN (pretrained)", "random init"]
    for r in res["rows"]:
        assert 0.0 <= r["linear_top1"] <= r["linear_top5"] <= 100.0 and 0.0 <= r["knn_top1"] <= 100.0
    assert res["pretrain"]["step"] == 6  # 24 images / batch 8 x 2 epochs
    assert res["margin_linear_top1"] == pytest.approx(res["rows"][0]["linear_top1"] - res["rows"][1]["linear_top1"])
    assert "| random init |" in (out / "demo_results.md").read_text()
    assert sorted(p.name for p in (data / "train").iterdir()) and (out / "final.pt").is_file()
    capsys.readouterr()

    # a second run reuses the dataset and the finished pretraining; its results are strict
    # JSON with the run's own loss (no NaN: nothing was trained or timed this time)
    assert main(["--out", str(out), "--data", str(data), *TOY]) == 0
    log = capsys.readouterr().out
    assert "nothing to train" in log and "Pretraining: 6 steps, done before this run" in log and "nan" not in log
    assert '"protocol": "linear probe' not in log  # the probes' epochs are a progress bar, not a line each
    again = json.loads((out / "demo_results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert again["pretrain"]["loss"] == pytest.approx(res["pretrain"]["loss"], rel=1e-4)
    assert again["pretrain"]["images_per_s"] is None

    # another run's settings in the demo's folder: refused, with the demo's own way to start over
    from mscn.errors import MscnError

    with pytest.raises(MscnError, match=r"belongs to another run \(differs in optim.base_lr\).*mscn demo --fresh") as e:
        main(["--out", str(out), "--data", str(data), *TOY, "optim.base_lr=0.123"])
    assert "--resume none" not in str(e.value)
