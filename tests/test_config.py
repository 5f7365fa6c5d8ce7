"""The typed config schema: defaults, YAML, overrides and one-line rejections."""
import pytest
import yaml

from mscn.config import Config, load_config, save_config, to_dict, validate
from mscn.errors import ConfigError


def test_paper_recipes_carry_appendix_a_values():
    s = load_config("simclr_r50_in1k")
    # base_lr is per 256 images: the paper's 4.8 / 3.2 are the peak lrs at batch 4096
    assert (s.train.global_batch, s.schedule.epochs, s.schedule.warmup_epochs) == (4096, 800, 10)
    assert s.optim.base_lr * s.train.global_batch / 256 == pytest.approx(4.8)
    assert (s.model.proj_hidden, s.model.proj_out, s.method.temperature) == (2048, 256, 0.2)
    b = load_config("byol_r50_in1k")
    assert b.optim.base_lr * b.train.global_batch / 256 == pytest.approx(3.2)
    assert (b.schedule.epochs, b.method.ema_base, b.model.proj_hidden, b.model.pred_hidden) == (1000, 0.996, 4096, 4096)
    assert [v.blur_prob for v in b.views[:2]] == [1.0, 0.1] and [v.solarize_prob for v in b.views[:2]] == [0.0, 0.2]
    for c in (s, b):
        assert len(c.views) == 4 and c.highpass.sigma == 5.0
        assert c.train.compile  # measured: +34 % fed ResNet-50 on an H200 (PERFORMANCE.md, round 4)
        assert all(v.mask.grid == 32 and v.mask.p_focal == 0.4 for v in c.views)
        assert c.views[0].mask.ratio == 0.15 and c.views[0].mask.ratio != c.views[1].mask.ratio  # asymmetric


def test_overrides_nested_and_indexed():
    c = load_config("demo", ["views.1.mask.ratio=0.3", "train.global_batch=16", "data.synthetic_size=[64, 48]"])
    assert c.views[1].mask.ratio == 0.3 and c.train.global_batch == 16 and c.data.synthetic_size == (64, 48)


def test_a_mapping_override_merges_into_its_section():
    """As the YAML file merges into the defaults: the keys not named keep the recipe's values."""
    base = load_config("demo")
    c = load_config("demo", ["views.1={mask: {ratio: 0.3}, solarize_prob: 0.1}", "data={num_threads: 3}"])
    assert c.views[1].mask.ratio == 0.3 and c.views[1].solarize_prob == 0.1 and c.data.num_threads == 3
    assert c.views[1].mask.p_focal == base.views[1].mask.p_focal and c.views[1].blur_prob == base.views[1].blur_prob
    assert c.views[1].scale == base.views[1].scale and c.data.synthetic == base.data.synthetic
    assert c.views[0] == base.views[0] and load_config("demo", ["views=[{flip_prob: 0.1}, {flip_prob: 0.2}]"]).views[1].flip_prob == 0.2


@pytest.mark.parametrize("override, key", [
    ("views.0.mask.ratoi=0.1", "views[0].mask.ratoi"),  # unknown key
    ("train.global_batch=abc", "train.global_batch"),  # wrong type
    ("views.0.mask.ratio=1.0", "views[0].mask.ratio"),  # out of range [0, 1)
    ("views.0.mask.ratio=-0.1", "views[0].mask.ratio"),
    ("highpass.sigma=0", "highpass.sigma"),
    ("highpass.window=4", "highpass.window"),
    ("method.name=moco", "method.name"),
    ("data.crop=random", "data.crop"),
    ("views.7.mask.ratio=0.1", "views.7.mask.ratio"),  # no such view
    ("train.global_batch", "train.global_batch"),  # not key=value
    ("train.global_batch.x=3", "'train.global_batch' is a value (64), not a section"),  # a key below a value
    ("views.0.mask.ratio.x.y=1", "'views.0.mask.ratio' is a value"),
])
def test_override_rejections_name_key_and_the_command_line(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    msg = str(e.value)
    # the bad value came from the command line, not from demo.yaml
    assert msg.startswith("command line: ") and key in msg and "demo.yaml" not in msg and "\n" not in msg
    if "[" not in key:
        assert msg.startswith(f"command line: {override}: "), msg


def test_a_bad_value_in_the_file_still_names_the_file(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text("highpass: {sigma: 0}\n")
    with pytest.raises(ConfigError, match=r"^\S*recipe\.yaml: .*highpass\.sigma") as e:
        load_config(p, ["train.global_batch=16"])  # a valid override does not take the blame
    assert "command line" not in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  base_lr: 0.1\n  wieght_decay: 0.0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'optim.wieght_decay'"):
        load_config(p)


def test_batch_not_divisible_by_world_size():
    c = Config()
    c.train.global_batch = 10
    with pytest.raises(ConfigError, match="world size"):
        validate(c, "x.yaml", world_size=4)
    validate(c, "x.yaml", world_size=2)


def test_missing_file_lists_bundled_recipes():
    with pytest.raises(ConfigError, match="simclr_r50_in1k"):
        load_config("no_such_recipe")


def test_a_directory_as_config_and_an_unquoted_number_as_a_string_say_what_to_do(tmp_path):
    (tmp_path / "config.yaml").write_text("train: {seed: 1}\n")
    with pytest.raises(ConfigError, match=r"--config .*: a directory, not a YAML recipe; its .*config.yaml is a run"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match=r"data.root: expected a string, got 123 \(YAML reads it as a number: "
                                          r"quote it, e.g. \"data.root='123'\""):
        load_config(None, ["data.root=123"])
    assert load_config(None, ["data.root='123'"]).data.root == "123"


def test_scientific_notation_is_a_number_on_the_command_line_and_in_a_file(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 without a dot as a string: it is still a number here."""
    cfg = load_config(None, ["optim.base_lr=1e-3", "optim.weight_decay=1.5E-6", "views.0.mask.ratio=2e-1"])
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.views[0].mask.ratio) == (1e-3, 1.5e-6, 0.2)
    f = tmp_path / "lr.yaml"
    f.write_text("optim:\n  base_lr: 3e-4\n")
    assert load_config(str(f)).optim.base_lr == 3e-4
    with pytest.raises(ConfigError, match=r"optim.base_lr: expected a number, got '1e-3x'"):
        load_config(None, ["optim.base_lr=1e-3x"])


def test_resolved_config_round_trips(tmp_path):
    c = load_config("byol_r50_in1k", ["views.2.mask.p_ind=0.5"])
    save_config(c, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(c)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["views"][2]["mask"]["p_ind"] == 0.5


def test_a_config_file_that_is_not_text_is_one_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"model:\n  arch: resnet18\n\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=r"bad.yaml: not a UTF-8 text file"):
        load_config(p)


def test_a_key_written_twice_in_a_yaml_file_is_refused_with_its_lines(tmp_path):
    """YAML keeps the last of two equal keys: a second ``data:`` block would silently drop the
    first one's settings. Syntax errors name their line and column."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("data:\n  root: /x\ntrain:\n  seed: 1\ndata:\n  image_size: 32\n")
    with pytest.raises(ConfigError, match=r"line 5, column 1: key 'data' appears twice \(first on line 1\)"):
        load_config(str(dup))
    nested = tmp_path / "nested.yaml"
    nested.write_text("data:\n  root: /x\n  root: /y\n")
    with pytest.raises(ConfigError, match=r"line 3, column 3: key 'root' appears twice"):
        load_config(str(nested))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  mean: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line 3, column 6: "):
        load_config(str(bad))
    ok = tmp_path / "ok.yaml"  # equal keys in different mappings are fine
    ok.write_text("data: {root: /x}\ntrain: {seed: 3}\nviews:\n  - {blur_prob: 0.5}\n  - {blur_prob: 0.5}\n")
    c = load_config(str(ok))
    assert c.data.root == "/x" and c.train.seed == 3 and len(c.views) == 2


def test_mscn_config_takes_the_recipe_first_or_as_a_flag(capsys):
    """`mscn config demo` read 'demo' as a malformed override ("expected key=value")."""
    from mscn.cli import main as mscn_main

    assert mscn_main(["config", "demo", "train.global_batch=32"]) == 0
    first = capsys.readouterr().out
    assert "global_batch: 32" in first and "arch: resnet18" in first  # the demo recipe, overridden
    assert mscn_main(["config", "--config", "demo", "train.global_batch=32"]) == 0
    assert capsys.readouterr().out == first
    assert mscn_main(["config", "demo", "nokey"]) == 2  # only the first word can be the recipe
    assert "nokey: expected key=value" in capsys.readouterr().err


@pytest.mark.parametrize("override, key", [
    ("highpass.sigma=.inf", "highpass.sigma"),  # crashed in the blur's radius: OverflowError
    ("views.0.blur_sigma=[0.1, .inf]", "views[0].blur_sigma[1]"),
    ("method.temperature=.inf", "method.temperature"),  # a constant loss: the run learned nothing
    ("views.0.mask.focal_aspect=[0.5, .inf]", "views[0].mask.focal_aspect[1]"),  # one-row focal strips
    ("optim.weight_decay=.nan", "optim.weight_decay"),
])
def test_a_setting_that_is_not_a_finite_number_is_refused(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.seed=3", override])
    assert str(e.value).startswith(f"command line: {override}: {key}: expected a finite number, got ")


def test_a_refusal_blames_the_overrides_it_names_in_view_keys_too():
    """Messages spell a view views[0].mask; the override views.0.mask. Every override was
    blamed for a view's error, and a cross-key one left out the view's own override."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.seed=3", "views.0.mask.ratio=1.0"])
    assert str(e.value).startswith("command line: views.0.mask.ratio=1.0: views[0].mask.ratio = 1.0: must be in")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.seed=3", "data.image_size=16", "views.0.mask.grid=20"])
    assert str(e.value).startswith("command line: data.image_size=16 views.0.mask.grid=20: views[0].mask.grid")
    with pytest.raises(ConfigError, match=r"command line: method.ema_final=1.5: method.ema_final = 1.5: must be in"):
        load_config(None, ["train.seed=3", "method.ema_final=1.5"])
    with pytest.raises(ConfigError, match=r"method.ema_final = 0.9: must be >= method.ema_base \(0.996\)"):
        load_config(None, ["method.ema_final=0.9"])
    with pytest.raises(ConfigError, match=r"data.num_threads: expected an integer or a string, got 2.5"):
        load_config(None, ["data.num_threads=2.5"])


def test_a_home_relative_path_in_a_recipe_is_expanded(tmp_path, monkeypatch):
    """'~/runs' in a YAML recipe (or a quoted override): no shell expands it, and
    train.out_dir became a folder named '~' in the current one."""
    import os

    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  root: ~/data/train\n  val_root: ~/data/val\ntrain:\n  out_dir: ~/runs/a\n")
    cfg = load_config(str(recipe), ["data.synthetic_dir='~/synth'"])
    assert (cfg.data.root, cfg.data.val_root, cfg.train.out_dir, cfg.data.synthetic_dir) == (
        os.path.join(tmp_path, "data/train"), os.path.join(tmp_path, "data/val"), os.path.join(tmp_path, "runs/a"),
        os.path.join(tmp_path, "synth"))
