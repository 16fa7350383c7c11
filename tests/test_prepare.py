"""prepare.py and the prepare scripts: documents -> shards, splits, reruns, settings, bad input."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoshift import prepare as prep
from conftest import DOCUMENTS
from nanoshift.common import InputError, SettingError
from nanoshift.data import EOT_TOKEN, get_tokenizer, iter_documents, read_shard, validate_shard, write_shard
from nanoshift.prepare import first_tokens_split, hashed_split, prepare_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def expected_stream(documents):
    enc = get_tokenizer()
    ids = []
    for doc in documents:
        if doc and not doc.isspace():
            ids += [EOT_TOKEN] + enc.encode_ordinary(doc)
    return np.array(ids, dtype=np.uint16)


def split_stream(out_dir, split):
    paths = sorted(glob.glob(os.path.join(out_dir, f"*_{split}_*.bin")))
    return [read_shard(p) for p in paths]


def read_all(out_dir):
    """Every shard's bytes, by file name (manifest included)."""
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out_dir, "*")))}


def write_inputs(folder, kind, documents):
    """The documents as parquet / jsonl / txt files (split over two files to test multi-file order)."""
    os.makedirs(folder, exist_ok=True)
    if kind == "txt":  # one document per file
        for i, doc in enumerate(documents):
            with open(os.path.join(folder, f"doc_{i:03d}.txt"), "w", encoding="utf-8") as f:
                f.write(doc)
        return os.path.join(folder, "*.txt")
    halves = [documents[:4], documents[4:]]
    for i, part in enumerate(halves):
        path = os.path.join(folder, f"part_{i}.{kind}")
        if kind == "parquet":
            pq.write_table(pa.table({"id": list(range(len(part))), "text": part}), path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                for j, doc in enumerate(part):
                    f.write(json.dumps({"id": j, "text": doc}) + "\n")
    return os.path.join(folder, f"*.{kind}")


def prepare(pattern, out_dir, **kwargs):
    kwargs = {"shard_tokens": 97, "num_proc": 1, "progress": False, **kwargs}
    val_tokens = kwargs.pop("val_tokens", 60)
    return prepare_shards(iter_documents(data_files=pattern), str(out_dir), "toy",
                          first_tokens_split(val_tokens), **kwargs)

# -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["parquet", "jsonl", "txt"])
def test_shards_hold_exactly_the_tokenized_documents(tmp_path, kind):
    pattern = write_inputs(tmp_path / "in", kind, DOCUMENTS)
    out_one, out_two = tmp_path / "out1", tmp_path / "out2"
    manifest = prepare(pattern, out_one, num_proc=1, chunk_chars=150)
    prepare(pattern, out_two, num_proc=2, chunk_chars=150)  # many chunks in flight at once
    assert read_all(out_one) == read_all(out_two)

    expected = expected_stream(DOCUMENTS)
    val, train = split_stream(out_one, "val"), split_stream(out_one, "train")
    assert np.array_equal(np.concatenate(val + train), expected)
    assert len(train) > 2 and all(len(s) == 97 for s in train[:-1]) and 0 < len(train[-1]) <= 97
    # val: the first whole documents until >= 60 tokens, so it ends where a document ends
    val_tokens = len(np.concatenate(val))
    assert val_tokens >= 60 and expected[val_tokens] == EOT_TOKEN
    # a shard boundary falls inside a document (shards are not document-aligned)
    assert any(s[0] != EOT_TOKEN for s in train[1:])
    assert manifest["documents_read"] == len(DOCUMENTS) and manifest["documents_skipped_empty"] == 2
    assert manifest["total_tokens"] == len(expected)
    assert manifest["splits"]["train"]["shards"][0] == "toy_train_000000.bin"
    for path in glob.glob(str(out_one / "*.bin")):
        validate_shard(path, vocab_size=50257)


def test_text_column_option_and_missing_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCUMENTS[:2]))
    docs = list(iter_documents(data_files=str(path), text_column="body"))
    assert docs == DOCUMENTS[:2]
    with pytest.raises(InputError, match=r"no column 'text'.*'body'"):
        list(iter_documents(data_files=str(path)))


def test_empty_and_missing_inputs_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="no input files match .*nothing"):
        prepare(str(tmp_path / "nothing*.parquet"), tmp_path / "out")
    pattern = write_inputs(tmp_path / "blank", "jsonl", ["", "  \n", "\t"])
    with pytest.raises(InputError, match=r"no tokens to write: the input had 3 document\(s\), 3 without text"):
        prepare(pattern, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed first run leaves no folder
    with pytest.raises(InputError, match="--data_files"):  # HF_HUB_OFFLINE=1 (conftest)
        next(iter_documents("HuggingFaceFW/fineweb-edu", "sample-10BT"))


@pytest.mark.parametrize("max_tokens", [1, 59, 60, 61, 200, 201, 10**9])
def test_max_tokens_is_an_exact_prefix(tmp_path, max_tokens):
    pattern = write_inputs(tmp_path / "in", "parquet", DOCUMENTS)
    manifest = prepare(pattern, tmp_path / "out", max_tokens=max_tokens, num_proc=2, chunk_chars=100)
    out = tmp_path / "out"
    stream = np.concatenate(split_stream(out, "val") + split_stream(out, "train"))
    assert np.array_equal(stream, expected_stream(DOCUMENTS)[:max_tokens])
    assert manifest["total_tokens"] == len(stream)


def test_rerun_skips_finished_output_and_checks_settings(tmp_path):
    pattern = write_inputs(tmp_path / "in", "jsonl", DOCUMENTS)
    first = prepare(pattern, tmp_path / "out")
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(tmp_path / "out" / "*"))}
    assert prepare(pattern, tmp_path / "out") == first
    assert stamps == {p: os.stat(p).st_mtime_ns for p in glob.glob(str(tmp_path / "out" / "*"))}
    with pytest.raises(InputError, match="--overwrite"):
        prepare(pattern, tmp_path / "out", shard_tokens=50)
    assert prepare(pattern, tmp_path / "out", shard_tokens=50, overwrite=True)["settings"]["shard_tokens"] == 50
    assert all(len(s) == 50 for s in split_stream(tmp_path / "out", "train")[:-1])


KILLED_RUN = """
import sys, time
sys.path.insert(0, {repo!r})
from nanoshift.data import iter_documents
from nanoshift.prepare import first_tokens_split, prepare_shards
def documents():
    for i, doc in enumerate(iter_documents(data_files={pattern!r})):
        if i == 40:
            print("stalling", flush=True)
            time.sleep(600)  # killed here, shards already written, more to come
        yield doc
prepare_shards(documents(), {out!r}, "toy", first_tokens_split(60), shard_tokens=97, progress=False, chunk_chars=100)
"""


def test_rerun_after_kill_equals_uninterrupted_run(tmp_path):
    docs = DOCUMENTS * 8  # 72 documents
    pattern = write_inputs(tmp_path / "in", "parquet", docs)
    reference = tmp_path / "reference"
    prepare(pattern, reference, chunk_chars=100)

    out = tmp_path / "out"
    os.makedirs(out)
    # a previous, longer run left a shard the new run will not produce, and a dead writer left a temp file
    write_shard(out / "toy_train_000999.bin", np.arange(10, dtype=np.uint16))
    (out / "toy_train_000001.bin.4242.tmp").write_bytes(b"half a shard")
    write_shard(out / "other_train_000000.bin", np.arange(10, dtype=np.uint16))  # not ours: must survive
    script = KILLED_RUN.format(repo=REPO, pattern=pattern, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert proc.stdout.readline().strip() == "stalling"
        deadline = time.time() + 60
        while len(glob.glob(str(out / "toy_train_*.bin"))) < 3 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "_done.json").exists()  # the killed run is not mistaken for a finished one
    assert len(glob.glob(str(out / "toy_train_*.bin"))) >= 3

    prepare(pattern, out, chunk_chars=100)
    os.remove(out / "other_train_000000.bin")
    assert read_all(out) == read_all(reference)


def test_hashed_split_is_deterministic_and_near_the_fraction():
    choose = hashed_split(0.05, seed=2357)
    splits = [choose(i, None) for i in range(20000)]
    assert splits == [hashed_split(0.05, seed=2357)(i, None) for i in range(20000)]
    assert 0.04 < splits.count("val") / len(splits) < 0.06
    assert splits != [hashed_split(0.05, seed=1)(i, None) for i in range(20000)]


def run_script(*args):
    result = subprocess.run([sys.executable, *args, "--no_progress"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return result


def test_prepare_owt_script_val_split(tmp_path):
    docs = [f"Article {i}.\n\n" + DOCUMENTS[i % len(DOCUMENTS)] for i in range(60)]
    pattern = write_inputs(tmp_path / "in", "jsonl", docs)
    run_script("prepare_owt.py", "--data_files", pattern, "--out_dir", str(tmp_path / "out"),
               "--val_fraction", "0.2", "--seed=7", "--shard_tokens", "500", "--num_proc=2")
    choose = hashed_split(0.2, seed=7)
    val_docs = [d for i, d in enumerate(docs) if choose(i, None) == "val"]
    train_docs = [d for i, d in enumerate(docs) if choose(i, None) == "train"]
    assert val_docs and train_docs
    out = tmp_path / "out"
    assert np.array_equal(np.concatenate(split_stream(out, "val")), expected_stream(val_docs))
    assert np.array_equal(np.concatenate(split_stream(out, "train")), expected_stream(train_docs))
    assert {"openwebtext_val_000000.bin", "openwebtext_train_000000.bin", "_done.json"} <= set(os.listdir(out))
    manifest = json.loads((out / "_done.json").read_text())
    assert manifest["settings"]["seed"] == 7 and manifest["settings"]["data_files"] == [pattern]


def test_prepare_fineweb_script_and_offline_hub_message(tmp_path):
    pattern = write_inputs(tmp_path / "in", "txt", DOCUMENTS)
    halves = [pattern.replace("*", "doc_00[0-4]"), pattern.replace("*", "doc_00[5-9]")]  # several globs, in order
    run_script("prepare_fineweb.py", "--data_files", *halves, "--out_dir", str(tmp_path / "out"),
               "--val_tokens", "60", "--shard_tokens", "97", "--max_tokens", "2_50", "--name", "toy")
    out = tmp_path / "out"
    assert os.path.exists(out / "toy_val_000000.bin")
    assert np.array_equal(np.concatenate(split_stream(out, "val") + split_stream(out, "train")),
                          expected_stream(DOCUMENTS)[:250])
    failed = subprocess.run([sys.executable, "prepare_fineweb.py", "--out_dir", str(tmp_path / "hub")], cwd=REPO,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "--data_files" in failed.stderr



@pytest.mark.parametrize("script", ["prepare_fineweb.py", "prepare_owt.py"])
def test_prepare_script_bad_setting_exits_2_naming_it(tmp_path, script):
    for bad, named in ((["--shard_token=5"], "'shard_token'"), (["--max_tokens", "lots"], "max_tokens")):
        result = subprocess.run([sys.executable, script, *bad, "--out_dir", str(tmp_path / "out")], cwd=REPO,
                                capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "did you mean --shard_tokens" in subprocess.run(
        [sys.executable, script, "--shard_token=5"], cwd=REPO, capture_output=True, text=True).stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_prepare_fineweb_settings_demo_defaults_and_value_forms(capsys):
    import prepare_fineweb

    assert prepare_fineweb.settings_from([]) == {**prepare_fineweb.DEFAULTS, "name": "fineweb_edu"}
    demo = prepare_fineweb.settings_from(["--demo"])
    assert demo == {**prepare_fineweb.DEFAULTS, **prepare_fineweb.DEMO, "demo": True, "name": "demo"}
    override = prepare_fineweb.settings_from(["--demo", "--out_dir", "elsewhere", "--val_tokens=5"])
    assert (override["out_dir"], override["val_tokens"], override["shard_tokens"]) == ("elsewhere", 5, 500_000)
    forms = prepare_fineweb.settings_from(["--streaming", "--max_tokens", "1_000_000_000", "--data_files", "a/*.txt",
                                           "b/*.txt", "--no_progress", "--overwrite"])
    assert forms["max_tokens"] == 1_000_000_000 and forms["data_files"] == ["a/*.txt", "b/*.txt"]
    assert forms["streaming"] and forms["no_progress"] and forms["overwrite"] and not forms["demo"]
    assert prepare_fineweb.settings_from(["--data_files=dl/*.parquet"])["data_files"] == ["dl/*.parquet"]
    with pytest.raises(SettingError, match="max_tokens"):
        prepare_fineweb.settings_from(["--max_tokens=0"])

def test_demo_corpus_second_call_does_not_fetch(tmp_path, monkeypatch):
    cache = tmp_path / "demo"
    cache.mkdir()
    (cache / "hamlet_gut.txt").write_text(DOCUMENTS[0])
    (cache / "_complete.json").write_text(json.dumps({"files": ["hamlet_gut.txt"]}))

    def no_fetch(*args, **kwargs):
        raise AssertionError("demo_corpus fetched again")
    monkeypatch.setattr(subprocess, "run", no_fetch)
    assert prep.demo_corpus(str(cache)) == [str(cache / "hamlet_gut.txt")]


@pytest.mark.parametrize("script, argv, needle", [
    ("prepare_fineweb.py", [], "could not load 'HuggingFaceFW/fineweb-edu'"),
    ("prepare_owt.py", ["--data_files", "/nonexistent/*.txt"], "no input files match '/nonexistent/*.txt'"),
])
def test_prepare_script_input_problem_is_one_message_not_a_traceback(tmp_path, script, argv, needle):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, script, f"--out_dir={tmp_path / 'out'}", *argv],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and f"error: {needle}" in result.stderr
    if script == "prepare_fineweb.py":
        assert "--data_files" in result.stderr  # says how to work offline

# -----------------------------------------------------------------------------
# bad input: one line, the exit status of the rule (2 a setting, 1 the data), nothing earlier lost


def prepare_script(script, tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, env=env)


@pytest.mark.parametrize("script, args, code, named", [
    ("prepare_owt.py", ["--val_fraction=1.5"], 2, "val_fraction must be in (0, 1)"),
    ("prepare_owt.py", ["--val_fraction=0"], 2, "val_fraction must be in (0, 1)"),
    ("prepare_fineweb.py", ["--val_tokens=-5"], 2, "val_tokens must be an int >= 0"),
    ("prepare_fineweb.py", ["--shard_tokens=100_000_000_000_000"], 2, "shard_tokens=100,000,000,000,000 needs"),
    ("prepare_fineweb.py", ["--name=../escape"], 2, "name='../escape'"),
    ("prepare_fineweb.py", ["--name=a/b"], 2, "name='a/b'"),
    ("prepare_fineweb.py", ["--data_files={docs}/empty.jsonl"], 1, "empty.jsonl'] is empty"),
    ("prepare_fineweb.py", ["--data_files={docs}/numbers.jsonl"], 1, "column 'text' holds a int"),
    ("prepare_fineweb.py", ["--data_files={docs}/latin1.txt"], 1, "latin1.txt is not UTF-8 text (byte 3)"),
])
def test_bad_prepare_input_is_one_line_and_leaves_no_folder(tmp_path, script, args, code, named):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "empty.jsonl").write_text("")
    (docs / "numbers.jsonl").write_text('{"text": 7}\n{"text": "fine"}\n')
    (docs / "latin1.txt").write_bytes("caf\u00e9 na\u00efve".encode("latin-1"))
    out = tmp_path / "out"
    result = prepare_script(script, tmp_path, f"--out_dir={out}", *[a.replace("{docs}", str(docs)) for a in args])
    assert result.returncode == code, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()  # no empty output folder left behind


def test_a_second_prepare_into_the_same_folder_is_refused_and_destroys_nothing(tmp_path):
    pattern = write_inputs(tmp_path / "in", "jsonl", DOCUMENTS)
    out = tmp_path / "out"
    prepare(pattern, out)
    before = read_all(out)
    lock = prep._lock_folder(str(out))  # a prepare that is still running holds this
    try:
        with pytest.raises(InputError, match=rf"another prepare \(pid {os.getpid()}\) is writing into {out}"):
            prepare(pattern, out, overwrite=True)
    finally:
        lock.close()
    assert read_all(out) == before  # the refused run removed nothing
    prepare(pattern, out, overwrite=True)  # once the first one is done, the folder is free again
    assert prep.LOCK_NAME not in os.listdir(out)


def test_two_prepare_processes_at_once_one_waits_its_turn_or_fails_cleanly(tmp_path):
    pattern = write_inputs(tmp_path / "in", "jsonl", DOCUMENTS)
    out = tmp_path / "out"
    code = (f"import sys; sys.path.insert(0, {REPO!r})\n"
            f"from nanoshift.data import iter_documents\nfrom nanoshift.prepare import first_tokens_split, prepare_shards\n"
            f"prepare_shards(iter_documents(data_files={pattern!r}), {str(out)!r}, 'toy', first_tokens_split(60), "
            f"shard_tokens=97, progress=False, overwrite=True)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in results)
    for rc, err in results:  # the other either ran after it, or was refused: never a mix of both runs' files
        assert rc == 0 or "another prepare" in err, err
    reference = tmp_path / "reference"
    prepare(pattern, reference)
    assert read_all(out) == read_all(reference)
