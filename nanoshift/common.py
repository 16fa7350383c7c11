"""
Small pieces every part of nanoshift shares: the error rule, atomic files, globs, jsonl logs,
markdown tables, the CPU thread count and the machine, and running the steps of a pipeline. A library
module: it imports nothing of the project.

Errors and exit codes (one rule for every entry point, applied by `run_main` / `exit_with`):
    SettingError   a bad setting (value, combination, unknown key)        -> "config error: ...", exit 2
    InputError     bad or missing data, checkpoint or file; a failure    -> "error: ...", exit 1
                   at run time that the user can act on
Library code raises these (or plain ValueError / OSError for programming-level misuse, which the
entry points also report as exit 1); NANOSHIFT_TRACEBACK=1 shows the traceback as well.

Atomic files: `atomic_write(path)` yields a file object on a temporary name in the same folder,
fsyncs it and renames it over `path` only when the block succeeds; on any error (a crash, a full
disk) the temporary file is removed and `path` keeps what it held before.
"""

import contextlib
import glob
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings


class NanoshiftError(Exception):
    """A problem the user can fix: reported as one line, no traceback, exit status `exit_code`."""

    exit_code = 1
    prefix = "error"


class InputError(NanoshiftError):
    """Bad or missing data, checkpoint or output location (exit 1)."""


class SettingError(NanoshiftError, ValueError):
    """A bad setting (exit 2). Also a ValueError, so library callers that catch ValueError see it."""

    exit_code = 2
    prefix = "config error"


# errors of library code that mean "bad input" rather than a bug in nanoshift
REPORTED_ERRORS = (NanoshiftError, OSError, ValueError, KeyError, ImportError)


def exit_with(error):
    """Print `error` as one line on stderr and exit with its status (2 for a setting, else 1)."""
    code = getattr(error, "exit_code", 1)
    prefix = getattr(error, "prefix", "error")
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"{prefix}: {message}", file=sys.stderr)
    sys.exit(code)


def run_main(main, *args):
    """Run an entry point's main; a REPORTED_ERRORS exception becomes one line and its exit status."""
    try:
        return main(*args)
    except REPORTED_ERRORS as e:
        if os.environ.get("NANOSHIFT_TRACEBACK") == "1":
            raise
        exit_with(e)

def report_uncaught_errors():
    """For flat scripts (train.py): an uncaught NanoshiftError ends the process like exit_with does (one line,
    its exit status); anything else keeps Python's traceback."""
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, NanoshiftError) and os.environ.get("NANOSHIFT_TRACEBACK") != "1":
            print(f"{exc.prefix}: {exc}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.exit_code)
        sys.__excepthook__(exc_type, exc, tb)
    sys.excepthook = hook

# -----------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Write `path` all or nothing: a temporary file next to it, fsynced, then renamed over it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def finite_or_none(obj, where="", found=None):
    """A copy of a JSON-able structure with every NaN/inf float replaced by None (recorded in found)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if found is not None:
            found.append(where or "(value)")
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def write_json(path, obj, indent=1):
    """Atomic JSON; non-finite numbers become null (valid JSON) with a warning naming them."""
    found = []
    clean = finite_or_none(obj, found=found)
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        warnings.warn(f"{path}: non-finite numbers written as null: {shown}", stacklevel=2)
    with atomic_write(path) as f:
        json.dump(clean, f, indent=indent, default=str, allow_nan=False)
        f.write("\n")
    return path


def write_text(path, text):
    with atomic_write(path) as f:
        f.write(text)
    return path


def check_out_dir(path, setting="out_dir"):
    """Fail early (SettingError naming the setting) if path cannot become a writable folder.

    Creates nothing: a run that fails later leaves no empty folder behind.
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise SettingError(f"{setting}={path!r} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise SettingError(f"{setting}={path!r} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SettingError(f"{setting}={path!r} cannot be created: {parent} is not a writable folder")


def expand_globs(patterns, what="files", hint=""):
    """Sorted paths matching each glob (a string or a list); InputError for a pattern that matches nothing."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise InputError(f"no {what} match {pattern!r}{hint}")
        paths += [m for m in matches if m not in paths]
    return paths


def read_jsonl(path):
    """The JSON rows of a jsonl file. A torn last line (a crash mid-write) is dropped with a note;
    a bad line elsewhere is an InputError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == last:
                print(f"note: {path}:{i + 1}: ignoring a torn last line (a crash while it was written)",
                      file=sys.stderr)
                break
            raise InputError(f"{path}:{i + 1}: not a JSON line ({e})") from e
    return rows

# -----------------------------------------------------------------------------
# CPU threads


def cpu_threads(setting=0):
    """How many CPU threads torch should use: `setting` if > 0; else OMP_NUM_THREADS when set; else half
    the cores this process may run on (at least 1). Why half: torch's OpenMP threads wait for each other
    at every parallel region, so when another busy process takes a core, one descheduled thread stalls
    all the others; on a 2-core machine with one competing process a step took ~15x longer with 2
    threads than with 1. Half the cores leaves room for a neighbour and costs at most 2x when idle."""
    if setting and setting > 0:
        return int(setting)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def set_threads(setting=0):
    """Apply cpu_threads(setting) to torch (intra-op threads); returns the number."""
    import torch  # here, not at the top: common.py stays importable without torch's start-up cost

    if setting is not None and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 0):
        raise SettingError(f"threads must be 0 (auto) or a positive int, got {setting!r}")
    n = cpu_threads(setting)
    torch.set_num_threads(n)
    return n

def machine_line(threads):
    """The machine numbers came from: CPU model, cores, torch threads (they change the last digits)."""
    import torch  # here, not at the top (see set_threads)

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s) per process, torch {torch.__version__}"

# -----------------------------------------------------------------------------
# Steps of a pipeline (demo.py, reproduce.py)


def run_step(cmd, log_path, who):
    """Run one command with its output shown live and copied to log_path; its wall time in seconds. If it
    fails, say so ("{who}: step failed ...", naming the log) and exit with its status: a pipeline stops at
    its first failed step."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while chunk := proc.stdout.read1(1 << 16):  # bytes as they come: progress bars stay bars
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        proc.wait()
    seconds = time.time() - t0
    if proc.returncode != 0:
        print(f"\n{who}: step failed (exit {proc.returncode}) after {seconds:.0f}s: {' '.join(cmd)}\n"
              f"      its output is in {log_path}", file=sys.stderr)
        sys.exit(proc.returncode)
    print(f"[{os.path.splitext(os.path.basename(log_path))[0]}: {seconds:.0f}s]", flush=True)
    return seconds

# -----------------------------------------------------------------------------
# Text


def markdown_table(header, rows, align=None):
    """A markdown table; align: one of 'left'/'right' per column (default left)."""
    rule = {"right": "---:", "left": "---"}
    lines = ["| " + " | ".join(map(str, header)) + " |",
             "| " + " | ".join(rule[a] for a in (align or ["left"] * len(header))) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
