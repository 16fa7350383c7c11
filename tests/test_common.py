"""common.py: atomic files (a failure leaves the old file and no temporary one), non-finite numbers in
JSON, torn jsonl lines, globs, and the error rule."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from nanoshift.common import (InputError, SettingError, atomic_write, expand_globs, markdown_table, read_jsonl, run_main,
                    write_json)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old and whole")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write('{"half": ')
            raise RuntimeError("crash in the middle of writing")
    assert path.read_text() == "old and whole" and os.listdir(tmp_path) == ["metrics.json"]
    with atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["metrics.json"]


def test_a_killed_writer_never_leaves_a_half_file_under_the_real_name(tmp_path):
    path = tmp_path / "out.json"
    path.write_text('{"old": true}')
    code = ("import os, sys; sys.path.insert(0, %r)\nfrom nanoshift.common import atomic_write\n"
            "with atomic_write(%r) as f:\n    f.write('{\"partial\": ')\n    f.flush()\n    os._exit(9)\n"
            % (ROOT, str(path)))
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert json.loads(path.read_text()) == {"old": True}  # the reader still sees the old, whole file


def test_non_finite_numbers_become_null_with_a_warning(tmp_path):
    path = tmp_path / "m.json"
    with pytest.warns(UserWarning, match=r"non-finite numbers written as null: models\[0\].loss, models\[0\].layers\[1\]"):
        write_json(path, {"models": [{"loss": float("nan"), "layers": [1.0, float("inf")], "ok": 2}]})
    assert json.loads(path.read_text()) == {"models": [{"loss": None, "layers": [1.0, None], "ok": 2}]}


def test_read_jsonl_drops_a_torn_last_line_but_not_a_bad_middle_one(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert "torn last line" in capsys.readouterr().err
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(InputError, match=r"log.jsonl:2: not a JSON line"):
        read_jsonl(path)


def test_expand_globs_names_the_pattern_that_matched_nothing(tmp_path):
    (tmp_path / "a.bin").write_text("")
    assert expand_globs([str(tmp_path / "*.bin"), str(tmp_path / "a.bin")], "shards") == [str(tmp_path / "a.bin")]
    with pytest.raises(InputError, match=r"no shards match '.*nothing\*' \(hint\)"):
        expand_globs(str(tmp_path / "nothing*"), "shards", hint=" (hint)")


def test_run_main_exit_codes_follow_the_rule(capsys):
    for error, code, prefix in ((SettingError("bad k"), 2, "config error: bad k"),
                                (InputError("no such file"), 1, "error: no such file"),
                                (FileNotFoundError("gone"), 1, "error: gone")):
        def main():
            raise error
        with pytest.raises(SystemExit) as stop:
            run_main(main)
        assert stop.value.code == code and capsys.readouterr().err.strip() == prefix
    with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as bad input: its traceback stays
        run_main(lambda: 1 / 0)


def test_markdown_table_aligns_columns_as_asked():
    assert markdown_table(["a", "b"], [[1, "x"]], align=["left", "right"]).splitlines() == [
        "| a | b |", "| --- | ---: |", "| 1 | x |"]
