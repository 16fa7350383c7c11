"""configurator.py: config files, typed --key=value overrides, and their error messages."""

import subprocess
import sys
import textwrap

import pytest

from nanoshift.configurator import ConfigError, configure

DEFAULTS = dict(out_dir="out", batch_size=12, learning_rate=6e-4, compile=True, init_from="scratch",
                wandb_run_name=None, cut_layer=-1, ckpt=[], note="")


def test_defaults_pass_through_untouched():
    assert configure(DEFAULTS, []) == DEFAULTS


def test_config_file_overrides_defaults_and_can_compute(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text(textwrap.dedent("""
        import math
        _tokens = 2 ** 10          # private helper: ignored
        batch_size = _tokens // 64
        learning_rate = 3          # an int for a float setting
        def _helper(): pass
    """))
    s = configure(DEFAULTS, [str(cfg)])
    assert s["batch_size"] == 16
    assert s["learning_rate"] == 3.0 and isinstance(s["learning_rate"], float)


def test_config_file_sees_earlier_settings(tmp_path):
    (tmp_path / "a.py").write_text("batch_size = 8\n")
    (tmp_path / "b.py").write_text("batch_size = batch_size * 2\n")
    assert configure(DEFAULTS, [str(tmp_path / "a.py"), str(tmp_path / "b.py")])["batch_size"] == 16


def test_missing_config_file_names_its_path(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.py"):
        configure(DEFAULTS, [str(tmp_path / "missing.py")])


def test_unknown_key_in_config_file_suggests_closest(tmp_path):
    (tmp_path / "c.py").write_text("batch_sise = 4\n")
    with pytest.raises(ConfigError, match=r"c.py: unknown setting 'batch_sise'; did you mean --batch_size"):
        configure(DEFAULTS, [str(tmp_path / "c.py")])


def test_config_file_value_of_wrong_type_fails(tmp_path):
    (tmp_path / "c.py").write_text("batch_size = 8.5\n")
    with pytest.raises(ConfigError, match="batch_size: expected int, got float 8.5"):
        configure(DEFAULTS, [str(tmp_path / "c.py")])


def test_config_file_that_raises_names_the_file(tmp_path):
    (tmp_path / "c.py").write_text("batch_size = 1 / 0\n")
    with pytest.raises(ConfigError, match="error while running config file .*c.py: ZeroDivisionError"):
        configure(DEFAULTS, [str(tmp_path / "c.py")])


def test_overrides_parse_by_default_type():
    s = configure(DEFAULTS, ["--batch_size=32", "--learning_rate=1e-3", "--out_dir=123", "--compile=false"])
    assert s["batch_size"] == 32 and s["learning_rate"] == 1e-3
    assert s["out_dir"] == "123"  # strings are literal, never evaluated
    assert s["compile"] is False


def test_int_accepted_for_float_but_not_float_for_int():
    assert configure(DEFAULTS, ["--learning_rate=1"])["learning_rate"] == 1.0
    with pytest.raises(ConfigError, match="batch_size: expected int, got float 1.5"):
        configure(DEFAULTS, ["--batch_size=1.5"])


@pytest.mark.parametrize("text, value", [("True", True), ("False", False), ("true", True), ("false", False),
                                         ("1", True), ("0", False)])
def test_booleans_parse_from_common_spellings(text, value):
    assert configure(DEFAULTS, [f"--compile={text}"])["compile"] is value


def test_bad_boolean_fails():
    with pytest.raises(ConfigError, match="compile: expected a boolean"):
        configure(DEFAULTS, ["--compile=yes please"])


def test_none_default_can_be_set_to_any_literal_or_string():
    assert configure(DEFAULTS, ["--wandb_run_name=run-1"])["wandb_run_name"] == "run-1"
    assert configure(DEFAULTS, ["--wandb_run_name=42"])["wandb_run_name"] == 42
    assert configure(DEFAULTS, ["--wandb_run_name=None"])["wandb_run_name"] is None


def test_values_may_contain_equals_sign():
    assert configure(DEFAULTS, ["--note=a=b=c"])["note"] == "a=b=c"


def test_unknown_override_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown setting 'lerning_rate'; did you mean --learning_rate"):
        configure(DEFAULTS, ["--lerning_rate=1e-3"])
    with pytest.raises(ConfigError) as err:
        configure(DEFAULTS, ["--zzzz=1"])
    assert "did you mean" not in str(err.value)


def test_extra_types_allow_int_or_list():
    extra = {"cut_layer": (int, list)}
    assert configure(DEFAULTS, ["--cut_layer=3"], extra)["cut_layer"] == 3
    assert configure(DEFAULTS, ["--cut_layer=[3,7]"], extra)["cut_layer"] == [3, 7]
    assert configure(DEFAULTS, ["--cut_layer", "3", "7"], extra)["cut_layer"] == [3, 7]
    with pytest.raises(ConfigError, match="cut_layer: expected int or list"):
        configure(DEFAULTS, ["--cut_layer=2.5"], extra)
    with pytest.raises(ConfigError, match="cut_layer: expected int, got list"):
        configure(DEFAULTS, ["--cut_layer=[1]"])


def test_space_separated_values_and_bare_flags():
    s = configure(DEFAULTS, ["--ckpt", "a/ckpt.pt", "b/ckpt.pt", "--batch_size", "4", "--compile"])
    assert s["ckpt"] == ["a/ckpt.pt", "b/ckpt.pt"] and s["batch_size"] == 4 and s["compile"] is True
    with pytest.raises(ConfigError, match="--batch_size needs a value"):
        configure(DEFAULTS, ["--batch_size"])
    with pytest.raises(ConfigError, match="--batch_size takes one value, got 2"):
        configure(DEFAULTS, ["--batch_size", "1", "2"])


def test_later_arguments_win():
    assert configure(DEFAULTS, ["--batch_size=1", "--batch_size=2"])["batch_size"] == 2


def test_entry_point_exits_2_with_one_clear_line(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(__import__('os').getcwd())!r})
        from nanoshift.configurator import configure_or_exit
        print(configure_or_exit({{"batch_size": 1}}))
    """))
    bad = subprocess.run([sys.executable, str(script), "--batch_sze=2"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("config error: unknown setting 'batch_sze'; did you mean --batch_size? "
                                  "(run with --help to list all settings)")
    ok = subprocess.run([sys.executable, str(script), "--batch_size=2"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "{'batch_size': 2}"
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--batch_size = 1" in helped.stdout
