"""The documentation against the code: every shell command in README.md and docs/ that runs a project script
(`python X.py ...`, `torchrun ... X.py ...`, in a bash code block or an inline `code` span) names a script that
exists, config files that exist, and only settings that the script accepts; every relative link points at a
file that exists, and at a heading that exists when it names one (#anchor). The settings a script accepts are
read from its own --help (every entry point prints it from its settings block), run once per script, all of
them in one Python process (torch imported once); each must exit 0. One command is run for real: the per-rank memory table of
docs/sharded-training.md is what `python bench.py --section=fsdp_memory` prints. A fake page with a made-up
setting, config file, script and link shows that each check can fail.

    python -m pytest -q tests/test_docs.py
"""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
HELP_ARGS = {"harness.py": ["run", "--help"]}  # lm_eval's command line: its options are run's
PASSES_ON = {"seeds.py": "train.py"}  # seeds.py hands every setting but its own to train.py
SEPARATORS = {";", "&", "&&", "|", "||", "do", "then", "done"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}


def doc_pages(root=ROOT):
    """README.md and every markdown page under docs/ (the published reports included)."""
    pages = [os.path.join(root, "README.md")]
    return pages + sorted(glob.glob(os.path.join(root, "docs", "**", "*.md"), recursive=True))


def shell_commands(text):
    """The shell commands of a markdown page: every line of its shell code blocks (backslash continuations
    joined), and every inline code span that starts with python or torchrun."""
    commands = []
    for language, body in FENCE.findall(text):
        if language in SHELL_LANGUAGES:
            commands += [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    prose = FENCE.sub("", text)
    commands += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose) if re.match(r"(python3?|torchrun) ", span)]
    return commands


def is_python(token):
    return re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(token)) is not None


def invocations(command):
    """[(script, its arguments)] for each project script the command runs: `python X.py ...` (also
    .venv/bin/python), `torchrun [torchrun options] X.py ...`, after env assignments, srun and the like."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    tokens = list(lexer)
    found, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        script = None
        if is_python(token) and i + 1 < len(tokens) and tokens[i + 1].endswith(".py"):
            script = i + 1
        elif os.path.basename(token) == "torchrun":
            script = next((j for j in range(i + 1, len(tokens)) if tokens[j] in SEPARATORS or
                           (tokens[j].endswith(".py") and not tokens[j].startswith("-"))), None)
            script = None if script is None or tokens[script] in SEPARATORS else script
        if script is None:
            i += 1
            continue
        end = next((j for j in range(script + 1, len(tokens)) if tokens[j] in SEPARATORS), len(tokens))
        found.append((tokens[script], tokens[script + 1:end]))
        i = end
    return found


def scripts_in(pages):
    """Every project script the pages' commands run (a name relative to the repository root)."""
    names = set()
    for page in pages:
        with open(page) as f:
            for command in shell_commands(f.read()):
                try:
                    names.update(script for script, _ in invocations(command))
                except ValueError:
                    pass  # an unparsable command is reported by command_problems
    return names


# Runs each command's script as __main__ in one process, so that torch is imported once for all of them (~1.5 s
# each otherwise): its exit status, stdout and stderr, as JSON on the real stdout.
RUN_ALL = """
import contextlib, io, json, os, runpy, sys
results = {}
for key, argv in json.loads(sys.argv[1]).items():
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = list(argv)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:
            code, _ = 1, print(f"{type(e).__name__}: {e}", file=sys.stderr)
    results[key] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def run_scripts(commands, timeout=300):
    """{key: CompletedProcess-like result} of each command ({key: [script, arg, ...]}), every script run in turn
    as __main__ in one Python process at the repository root."""
    result = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(commands)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return {key: subprocess.CompletedProcess(commands[key], code, out, err)
            for key, (code, out, err) in json.loads(result.stdout.splitlines()[-1]).items()}


def accepted_settings(help_text):
    """The option names a --help output lists: `  --key = value` lines (nanoshift's configurator) and
    `  -m MODEL, --model MODEL` lines (argparse)."""
    names = {"help"}
    for line in help_text.splitlines():
        if line.lstrip().startswith("-"):
            names.update(re.findall(r"--([A-Za-z_][\w-]*)", line))
    return names


def command_problems(page, command, settings):
    """What is wrong with one command of a page: a missing script or config file, a setting the script does
    not accept (settings: {script: accepted names})."""
    problems = []
    try:
        runs = invocations(command)
    except ValueError as e:
        return [f"{page}: cannot parse {command!r}: {e}"]
    for script, args in runs:
        if not os.path.isfile(os.path.join(ROOT, script)):
            problems.append(f"{page}: no script {script} ({command!r})")
            continue
        accepted = settings.get(script, set()) | settings.get(PASSES_ON.get(script), set())
        for arg in args:
            if arg.startswith("--"):
                key = arg[2:].split("=", 1)[0]
                if key not in accepted:
                    problems.append(f"{page}: {script} has no setting --{key} ({command!r})")
            elif arg.endswith(".py") and not os.path.isfile(os.path.join(ROOT, arg)):
                problems.append(f"{page}: no config file {arg} ({command!r})")
    return problems


def slug(heading, seen):
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens, and -1, -2
    ... for repeats (seen counts them)."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    base = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
    count = seen.get(base, 0)
    seen[base] = count + 1
    return base if count == 0 else f"{base}-{count}"


def anchors(path):
    with open(path) as f:
        text = FENCE.sub("", f.read())
    seen = {}
    return {slug(heading, seen) for heading in re.findall(r"^#{1,6} +(.+?) *$", text, re.M)}


def link_problems(page):
    """Relative links and images of a page whose file, or heading, does not exist."""
    with open(page) as f:
        text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", f.read()))
    problems = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(full):
            problems.append(f"{page}: link to a missing file {target}")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            problems.append(f"{page}: link to a missing heading {target}")
    return problems


@pytest.fixture(scope="module")
def helps():
    """{script: CompletedProcess of its --help} for every script the documentation runs, and the one real
    command: bench.py's memory table (under the key "fsdp_memory")."""
    commands = {script: [script, *HELP_ARGS.get(script, ["--help"])]
                for script in sorted(scripts_in(doc_pages())) if os.path.isfile(os.path.join(ROOT, script))}
    commands["fsdp_memory"] = ["bench.py", "--section=fsdp_memory"]
    return run_scripts(commands)


@pytest.fixture(scope="module")
def settings(helps):
    return {script: accepted_settings(result.stdout) for script, result in helps.items()}


def test_the_documentation_runs_the_entry_points_and_every_help_exits_0(helps):
    scripts = scripts_in(doc_pages())
    assert {"train.py", "analyze.py", "eval_benchmarks.py", "demo.py", "harness.py", "seeds.py"} <= scripts
    for script in scripts:
        result = helps[script]
        assert result.returncode == 0, (script, result.stderr[-2000:])
        assert len(accepted_settings(result.stdout)) > 1, (script, result.stdout[:500])


def test_every_documented_command_names_real_scripts_config_files_and_settings(settings):
    problems, checked = [], 0
    for page in doc_pages():
        with open(page) as f:
            for command in shell_commands(f.read()):
                checked += len(invocations(command))
                problems += command_problems(os.path.relpath(page, ROOT), command, settings)
    assert checked > 60  # the pages are full of commands: a parser that finds none would pass everything
    assert not problems, "\n".join(problems)


def test_every_relative_link_points_at_a_file_and_heading_that_exist():
    problems = [p for page in doc_pages() for p in link_problems(page)]
    assert not problems, "\n".join(problems)


def test_the_readme_links_every_docs_page():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    pages = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))]
    assert pages and all(f"]({page})" in readme for page in pages), pages


def test_the_memory_table_is_what_bench_prints(helps):
    result = helps["fsdp_memory"]
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(ROOT, "docs", "sharded-training.md")) as f:
        page = f.read()
    rows = [line for line in page.splitlines() if re.match(r"\| (124M|1B|3B|7B) \|", line)]
    assert len(rows) == 12 and all(row in result.stdout.splitlines() for row in rows)


def test_the_checks_catch_a_made_up_setting_config_script_and_link(tmp_path, settings):
    page = tmp_path / "fake.md"
    page.write_text("# Fake\n\nSee [this](missing.md), [that](fake.md#no-such-heading) and [fine](fake.md#fake).\n\n"
                    "```bash\n"
                    "python analyze.py --ckpt out-a --no_such_setting=1   # made up\n"
                    "torchrun --standalone --nproc_per_node=2 train.py config/no_such_config.py --batch_size=8\n"
                    "python seeds.py config/gate.py --seeds=1,2 --bacth_size=8 \\\n    --max_iters=10\n"
                    "python no_such_script.py --x=1\n"
                    "```\n\nInline: `python eval_benchmarks.py --benchmark=lambada`.\n")
    problems = [p for command in shell_commands(page.read_text())
                for p in command_problems("fake.md", command, settings)]
    assert problems == ["fake.md: analyze.py has no setting --no_such_setting "
                        "('python analyze.py --ckpt out-a --no_such_setting=1   # made up')",
                        "fake.md: no config file config/no_such_config.py ('torchrun --standalone --nproc_per_node=2 "
                        "train.py config/no_such_config.py --batch_size=8')",
                        "fake.md: seeds.py has no setting --bacth_size ('python seeds.py config/gate.py --seeds=1,2 "
                        "--bacth_size=8      --max_iters=10')",
                        "fake.md: no script no_such_script.py ('python no_such_script.py --x=1')",
                        "fake.md: eval_benchmarks.py has no setting --benchmark "
                        "('python eval_benchmarks.py --benchmark=lambada')"]
    assert link_problems(str(page)) == [f"{page}: link to a missing file missing.md",
                                        f"{page}: link to a missing heading fake.md#no-such-heading"]


def test_commands_are_split_into_the_scripts_they_run():
    assert invocations("python3 -m venv .venv && .venv/bin/pip install -q torch && .venv/bin/python demo.py") == [
        ("demo.py", [])]
    assert invocations("for L in $(seq 0 11); do torchrun --standalone train.py config/cut.py --cut_layer=$L; done") \
        == [("train.py", ["config/cut.py", "--cut_layer=$L"])]
    assert invocations("srun torchrun --nnodes=$N --rdzv_endpoint=$head:29500 train.py config/gate.py --init_from=auto") \
        == [("train.py", ["config/gate.py", "--init_from=auto"])]
    assert invocations("python analyze.py --ckpt 'out-gate-s*' base='runs/none-*'  # groups") == [
        ("analyze.py", ["--ckpt", "out-gate-s*", "base=runs/none-*"])]
    assert invocations("HF_HUB_OFFLINE=1 .venv/bin/python -m pytest") == []
    seen = {}
    assert [slug(h, seen) for h in ("Several seeds: `seeds.py`, or a SLURM job array", "data", "data",
                                    "The idea (α<sub>l</sub>)")] == [
        "several-seeds-seedspy-or-a-slurm-job-array", "data", "data-1", "the-idea-αl"]
