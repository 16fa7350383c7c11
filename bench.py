"""
Throughput / memory benchmarks for nanoshift (not tests: numbers, printed as markdown).

    python bench.py                      # every section
    python bench.py --section data       # one section (--help lists them), or all
    python bench.py --section=fsdp --table_out=fsdp.md   # also write the section's table to a file

data: the full prepare path (parquet documents -> tokenizer pool -> shards on disk)
against the bare tokenizer (tiktoken encode_ordinary_batch) on the same text with
the same number of threads / processes, and the peak memory of a prepare run for
two corpus sizes (it should not grow with the corpus).
"""
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import eval_benchmarks
import train
from nanoshift import parallel
from nanoshift.common import SettingError, markdown_table, read_jsonl, run_main, write_text
from nanoshift.configurator import configure
from nanoshift.data import get_tokenizer, iter_documents, read_manifest, shard_name, write_shard
from nanoshift.floors import data_floors
from nanoshift.lens import LensOptions, analyze_model, lens_sums
from nanoshift.lm import OurGPT
from model import GPT, GPTConfig, residual_examples, residual_label
from nanoshift.prepare import demo_corpus, first_tokens_split, prepare_shards
from nanoshift.run import RunFacts
from nanoshift.training import train_step, with_registry_settings
from nanoshift.tuned_lens import CPU_TOKENS_PER_STEP, REFERENCE_STEPS, REFERENCE_TOKENS_PER_STEP, bench_tuned_lens


def machine_description():
    return (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, torch {torch.__version__}, {platform.system()}")


# -----------------------------------------------------------------------------
# data


def _demo_documents(target_chars=5000):
    """The demo corpus (Shakespeare) cut at paragraph breaks into web-page-sized documents."""
    documents = []
    for path in demo_corpus():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        current = ""
        for paragraph in text.split("\n\n"):
            current += paragraph + "\n\n"
            if len(current) >= target_chars:
                documents.append(current)
                current = ""
        if current:
            documents.append(current)
    return documents


def _chunk_tokens(documents):
    enc = get_tokenizer()
    return sum(len(enc.encode_ordinary(doc)) for doc in documents)


def _raw_process_pool(documents, num_proc, chunk_docs=64):
    """Bare tokenizer in a process pool (results counted and dropped): the best a pool can do."""
    chunks = [documents[i:i + chunk_docs] for i in range(0, len(documents), chunk_docs)]
    with multiprocessing.Pool(num_proc) as pool:
        return sum(pool.imap(_chunk_tokens, chunks))


_MEMORY_PROBE = """
import json, resource, sys
import datasets, pyarrow, torch  # everything prepare imports, so the baseline below includes it
from nanoshift.data import get_tokenizer, iter_documents
from nanoshift.prepare import first_tokens_split, prepare_shards
get_tokenizer()
baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
manifest = prepare_shards(iter_documents(data_files=sys.argv[1]), sys.argv[2], "bench", first_tokens_split(0),
                          shard_tokens=int(sys.argv[3]), num_proc=int(sys.argv[4]), progress=False, overwrite=True)
print(json.dumps({"tokens": manifest["total_tokens"], "baseline_kib": baseline_kib,
                  "parent_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def bench_data(num_proc=None, repeats=5):
    num_proc = num_proc or os.cpu_count()
    enc = get_tokenizer()
    documents = _demo_documents()
    corpus = documents * 4  # ~6M tokens: long enough that pool start-up and file opening are amortised
    shard_tokens = 1_000_000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        parquet = {}
        for copies in (1, 4):
            parquet[copies] = os.path.join(tmp, f"corpus_x{copies}.parquet")
            pq.write_table(pa.table({"text": documents * copies}), parquet[copies], row_group_size=256)
        list(iter_documents(data_files=parquet[4]))  # import datasets' builders, warm the page cache

        for procs in sorted({1, num_proc}):
            timings = {"raw tokenizer, threads (encode_ordinary_batch)": [], "raw tokenizer, process pool": [],
                       "prepare: parquet -> shards on disk": []}
            for _ in range(repeats):  # interleaved, best of repeats: the machine may be shared
                start = time.perf_counter()
                tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(corpus, num_threads=procs))
                timings["raw tokenizer, threads (encode_ordinary_batch)"].append((time.perf_counter() - start, tokens))
                if procs > 1:
                    start = time.perf_counter()
                    tokens = _raw_process_pool(corpus, procs)
                    timings["raw tokenizer, process pool"].append((time.perf_counter() - start, tokens))
                start = time.perf_counter()
                manifest = prepare_shards(iter_documents(data_files=parquet[4]), os.path.join(tmp, "out"), "bench",
                                          first_tokens_split(0), shard_tokens=shard_tokens, num_proc=procs,
                                          progress=False, overwrite=True)
                text_tokens = manifest["total_tokens"] - manifest["documents_read"]  # without the EOTs
                timings["prepare: parquet -> shards on disk"].append((time.perf_counter() - start, text_tokens))
            best = {name: max(tokens / seconds for seconds, tokens in runs) for name, runs in timings.items() if runs}
            reference = best["raw tokenizer, threads (encode_ordinary_batch)"]
            for name, rate in best.items():
                rows.append([procs, name, f"{rate / 1e6:.2f}", f"{rate / reference:.0%}"])

        memory_rows = []
        for copies in (1, 4):
            result = subprocess.run(
                [sys.executable, "-c", _MEMORY_PROBE, parquet[copies], os.path.join(tmp, "mem"), str(shard_tokens),
                 str(num_proc)], capture_output=True, text=True, check=True,
                cwd=os.path.dirname(os.path.abspath(__file__)))
            probe = json.loads(result.stdout.strip().splitlines()[-1])
            memory_rows.append([f"{probe['tokens'] / 1e6:.2f}M", num_proc, f"{shard_tokens / 1e6:.0f}M",
                                f"{probe['baseline_kib'] / 1024:.0f}", f"{probe['parent_kib'] / 1024:.0f}",
                                f"{probe['worker_kib'] / 1024:.0f}"])

    print(f"### data: tokenizer throughput ({len(corpus):,} documents, {sum(map(len, corpus)) / 1e6:.1f}M chars)\n")
    print(markdown_table(["procs", "path", "M tokens/s", "vs raw threads"], rows))
    print("\n### data: peak memory of a prepare run (ru_maxrss, MiB)\n")
    print(markdown_table(["corpus tokens", "procs", "shard_tokens", "parent after imports + tokenizer",
                          "parent peak", "largest worker peak"], memory_rows))


# -----------------------------------------------------------------------------
# eval


def bench_eval(repeats=5, sliding_repeats=2):
    """eval_benchmarks.evaluate against a bare forward (lm.logits) of the same model on the same tokens.

    GPT-2 124M's shape with random weights (throughput does not depend on the weights), one full
    1024-token window per pass, batch 1. The passes alternate and each path's best run counts: on a
    shared machine a slow run says more about the neighbours than about the code. evaluate's own
    forward is timed too, which splits each evaluate run into forward + scoring within the same run.
    """
    class TimedLM(OurGPT):
        forward_seconds = 0.0

        def logits(self, idx):
            start = time.perf_counter()
            out = super().logits(idx)
            self.forward_seconds += time.perf_counter() - start
            return out

    torch.manual_seed(0)
    lm = TimedLM(GPT(GPTConfig()), "gpt2-124M-shape")  # 12 layers x 768, 1024 context, 50304 vocab
    T = lm.block_size
    tokens = np.random.default_rng(0).integers(0, 50257, 2 * T + 1)
    x = torch.from_numpy(tokens[None, :T])

    def forward_only():
        with torch.inference_mode():
            lm.logits(x)

    def scored(n_tokens, stride):
        return lambda: eval_benchmarks.evaluate(lm, tokens[:n_tokens + 1], context=T, stride=stride, batch_size=1)

    forward_only()  # warm-up: allocator, thread pool
    paths = [  # (name, tokens scored per run, run, repeats)
        ("forward only: lm.logits", T, forward_only, repeats),
        (f"evaluate, stride = context ({T})", T, scored(T, T), repeats),
        (f"evaluate, stride = context / 2 ({T // 2}), 2 x {T} tokens", 2 * T, scored(2 * T, T // 2), sliding_repeats),
    ]
    best_wall, best_cpu = {}, {}  # seconds per token; CPU time moves less than wall time when neighbours are busy
    own_forward_share = []  # per evaluate run (stride = context): its forward's time / its total time
    for r in range(repeats):
        for name, n_tokens, run, n_repeats in paths:
            if r < n_repeats:
                lm.forward_seconds = 0.0
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                seconds = time.perf_counter() - wall
                best_wall[name] = min(best_wall.get(name, float("inf")), seconds / n_tokens)
                best_cpu[name] = min(best_cpu.get(name, float("inf")), (time.process_time() - cpu) / n_tokens)
                if name == paths[1][0]:
                    own_forward_share.append(lm.forward_seconds / seconds)
    forward = paths[0][0]
    rows = [[name, f"{1 / best_wall[name]:,.0f}", f"{best_wall[forward] / best_wall[name]:.1%}",
             f"{best_cpu[forward] / best_cpu[name]:.1%}"] for name in best_wall]
    print(f"### eval: scored tokens/s, GPT-2 124M shape, float32, batch 1, {torch.get_num_threads()} torch threads, "
          f"best of {repeats} (sliding: {sliding_repeats})\n")
    print(markdown_table(["path", "tokens/s (wall)", "vs forward only (wall)", "vs forward only (CPU time)"], rows))
    print(f"\nWithin each evaluate run (stride = context) its forward took {min(own_forward_share):.1%} to "
          f"{max(own_forward_share):.1%} of the time (median {float(np.median(own_forward_share)):.1%}): scoring, "
          f"batching and bookkeeping the rest. That split is measured inside one run, so it is immune to the "
          f"neighbours that move the rows above. stride = context / 2 runs 3 windows for 2 windows' tokens: "
          f"the price of >= {T // 2} tokens of context for every scored token.")


# -----------------------------------------------------------------------------
# train


def _device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:  # platform.processor() is often empty on Linux
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def _matmul_peak(device, dtype, n, clock, repeats=5):
    """FLOP/s of an n x n x n matmul, best of repeats: the practical peak MFU is measured against."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = clock()
        (a @ b).sum().item()  # .item(): wait for the GPU
        best = min(best, clock() - start)
    return 2 * n ** 3 / best


def bench_train(steps=1, repeats=13, warmup=2, tiny=False):
    """Training tokens/s and MFU for every residual mode on the same model, batch and seed.

    A training step is train.py's: forward under autocast (bf16 on GPU, fp32 on CPU), backward, clip,
    AdamW. On a GPU: GPT-2 124M, 16 x 1024 tokens, torch.compile. On CPU (a ~2-minute budget): GPT-2
    small's 12 layers at half the width (384), 4 x 128 tokens and an 8192-token vocabulary: on CPU the
    50k-wide logits of GPT-2's vocabulary are memory-bound and take most of a step, hiding the blocks
    where alpha acts; and the narrower the model, the larger the alpha multiply's share of a layer. So
    the CPU numbers overstate the attenuation cost, if anything. After `warmup` steps per mode, `repeats`
    rounds run `steps` steps of every mode; tokens/s is the median over rounds. MFU is against the
    measured peak of one large matmul in the training dtype on this device.

    Clock: wall time on a GPU. On CPU, one torch thread and that thread's CPU time: development
    machines are shared, and wall time there swings by 2x with other tenants' load (and two threads
    spin against each other), while a thread's CPU time does not; on an idle core the two are equal.
    """
    shape = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=256) if tiny else _train_shape()  # tiny: a quick check
    _bench_train_models({name: {**shape, **residual} for name, residual in residual_examples().items()},
                        "tokens/s per residual mode (every registered variant)", steps, repeats, warmup)


_PLAIN = residual_label({"residual_mode": "none"})  # the standard residual: the row the others are compared to


def _train_shape():
    """GPT-2 124M on a GPU; on CPU 12 layers x 384 and an 8192-token vocabulary (bench_train says why)."""
    if torch.cuda.is_available():
        return dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    return dict(n_layer=12, n_head=6, n_embd=384, vocab_size=8192)


def _matched_llama(shape):
    """The llama of this shape (n_kv_head = n_head / 3, as config/llama_baseline.py) whose SwiGLU width (a
    multiple of 64) brings its parameter count closest to the GPT-2 of the same shape."""
    with torch.device("meta"):
        target = GPT(GPTConfig(**shape)).num_params(non_embedding=False)
        best = None
        for width in range(64, 8 * shape["n_embd"] + 1, 64):
            llama = dict(shape, arch="llama", bias=False, n_kv_head=shape["n_head"] // 3, intermediate_size=width)
            gap = abs(GPT(GPTConfig(**llama)).num_params(non_embedding=False) - target)
            if best is None or gap < best[0]:
                best = (gap, llama)
    return best[1]


def bench_train_llama(steps=1, repeats=13, warmup=2):
    """bench_train for arch='llama': GPT-2 and a llama of matched parameter count (config/llama_baseline.py's
    recipe: n_kv_head = n_head / 3, the SwiGLU width that matches), then every residual mode on the llama.
    Same shapes, batch, clock and method as bench_train."""
    gpt2 = _train_shape()
    llama = _matched_llama(gpt2)
    models = {f"gpt2, {_PLAIN}": dict(gpt2, residual_mode="none")}
    models.update({f"llama, {name}": {**llama, **residual} for name, residual in residual_examples().items()})
    _bench_train_models(models, f"llama (n_kv_head {llama['n_kv_head']}, SwiGLU {llama['intermediate_size']}) "
                        f"vs gpt2 at matched parameters, and every residual mode on llama", steps, repeats,
                        warmup, baseline=f"llama, {_PLAIN}", first_column="model", show_params=True)


def saved_for_backward_bytes(model, x, y):
    """Bytes autograd keeps between one training forward and its backward (distinct storages, weights excluded):
    the activation memory of a step, where residual variants differ (streams, kept block outputs, extra
    scalars' inputs). Counted exactly, in eager mode, so a shared machine's load cannot move it."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


def _bench_train_models(models, title, steps, repeats, warmup, baseline=_PLAIN, first_column="residual mode",
                        show_params=False):
    """Time train.py's step for each {name: GPTConfig kwargs} and print the table (bench_train's method);
    "vs" is against the model named baseline."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    clock = time.perf_counter if cuda else time.thread_time
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # every op then runs in this thread, so thread_time sees all of it
    if cuda:
        B, T, dtype, compiled = 16, 1024, torch.bfloat16, True
    else:
        B, T, dtype, compiled = 4, 128, torch.float32, False
    facts = RunFacts.single_process(device, str(dtype).removeprefix("torch."), compiled, B * T)
    scaler = torch.amp.GradScaler(device, enabled=False)
    vocab_size = next(iter(models.values()))["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, vocab_size, (B, T), generator=generator).to(device) for _ in range(2))

    runs = {}
    for name, config in models.items():
        torch.manual_seed(0)  # the same initial weights for every mode (gates aside)
        model = GPT(GPTConfig(block_size=T, **config)).to(device)
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device)
        forward = torch.compile(model) if compiled else model
        runs[name] = (model, forward, optimizer)

    def train_steps(name, n):
        model, forward, optimizer = runs[name]
        for _ in range(n):  # train.py's step (its one host sync per step included)
            train_step(forward, optimizer, scaler, x, y, facts, B, grad_clip=1.0)
            optimizer.zero_grad(set_to_none=True)

    for name in models:
        train_steps(name, warmup)  # compile, allocator, thread pool
    # rounds: every mode once, the order rotated each round; "vs none" is the median over rounds of
    # the ratio within a round, which cancels load that drifts between rounds (a shared machine)
    names = list(models)
    seconds = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            train_steps(name, steps)
            seconds[name].append(clock() - start)
    peak = _matmul_peak(device, dtype, 8192 if cuda else 2048, clock)
    torch.set_num_threads(threads)
    MiB = 2 ** 20
    memory = {}  # {name: (saved for backward, weights + grads + AdamW state, peak CUDA memory of a step)}
    for name, (model, forward, optimizer) in runs.items():
        saved = saved_for_backward_bytes(model, x, y)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            train_steps(name, 1)
        train_step(forward, optimizer, scaler, x, y, facts, B, grad_clip=1.0)  # grads present for the count
        held = sum(parallel.held_state_bytes(model, optimizer).values())
        optimizer.zero_grad(set_to_none=True)
        memory[name] = (saved, held, torch.cuda.max_memory_allocated() if cuda else None)

    tokens = steps * B * T
    rows = []
    for name, times in seconds.items():
        rate = tokens / statistics.median(times)
        vs_none = statistics.median(t_none / t for t_none, t in zip(seconds[baseline], times))
        model = runs[name][0]
        mfu = model.flops_per_token(T) * rate / peak
        spread = (max(times) - min(times)) / statistics.median(times)
        params = [f"{model.num_params(non_embedding=False) / 1e6:.2f}M"] if show_params else []
        saved, held, cuda_peak = memory[name]
        rows.append([name, *params, f"{rate:,.0f}", f"{vs_none:.1%}", f"{mfu:.1%}",
                     f"{1000 * statistics.median(times) / steps:.0f}", f"{spread:.0%}", f"{saved / MiB:.1f}",
                     f"{saved / memory[baseline][0]:.2f}x", f"{held / MiB:.1f}",
                     *([f"{cuda_peak / MiB:,.0f}"] if cuda else [])])
    dtype_name = str(dtype).removeprefix("torch.")
    timing = "wall time" if cuda else "CPU time of 1 torch thread"
    shape = next(iter(models.values()))
    print(f"### train: {title} ({_device_name(device)}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {timing})\n")
    print(f"{shape['n_layer']} layers x {shape['n_embd']}, vocabulary {shape['vocab_size']}, {B} x {T} tokens per step, "
          f"{dtype_name}, "
          f"compile={compiled}; median of {repeats} rounds of {steps} step(s) per mode after {warmup} warm-up steps; "
          f"MFU against a measured {dtype_name} matmul peak of {peak / 1e12:.3f} TFLOP/s\n")
    print(markdown_table([first_column, *(["parameters"] if show_params else []), "tokens/s",
                          f"vs {baseline} (median ratio in a round)", "MFU", "ms / step", "spread (max-min)/median",
                          "saved for backward (MiB)", f"vs {baseline}", "weights, grads, AdamW (MiB)",
                          *(["peak CUDA memory of a step (MiB)"] if cuda else [])], rows))
    print("\nMemory: 'saved for backward' is what autograd keeps between a step's forward and backward "
          "(bench.saved_for_backward_bytes: distinct storages, weights excluded, counted in eager mode): the "
          "activation memory, which grows with batch x context; weights, grads and AdamW state are "
          "parallel.held_state_bytes after a step.")


# -----------------------------------------------------------------------------
# analyze

_ANALYZE_MEMORY_PROBE = """
import json, re, sys
import torch
from nanoshift.lens import analyze_model
from nanoshift.lm import OurGPT
n, T, B = (int(a) for a in sys.argv[1:4])
torch.manual_seed(0)
lm = OurGPT(GPT(GPTConfig()), "gpt2-124M-shape")
windows = torch.randint(0, 50257, (n, T + 1), generator=torch.Generator().manual_seed(0))
status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS (building the model peaks higher)
baseline_kib = status("VmRSS")
analyze_model(lm, list(torch.split(windows, B)), progress=False)
print(json.dumps({"baseline_kib": baseline_kib, "peak_kib": status("VmHWM")}))
"""


def bench_analyze(repeats=2, B=2, T=128, memory_sequences=(2, 8)):
    """analyze.analyze_model against a bare forward (lm.logits) of the same model on the same tokens,
    and its peak memory (a fresh Linux process each: /proc peak RSS) for two numbers of sequences.

    GPT-2 124M's shape with random weights, B x T tokens, float32 on CPU. The analysis decodes all 13
    states (embeddings + 12 blocks) through the 50304 x 768 unembedding where the forward decodes one,
    so its floor is the trunk plus 13 lens matmuls, timed on their own (no metrics) as a reference.
    Paths alternate, best of `repeats`.
    """
    torch.manual_seed(0)
    lm = OurGPT(GPT(GPTConfig()), "gpt2-124M-shape")
    windows = torch.randint(0, 50257, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x = windows[:, :-1]

    @torch.inference_mode()
    def forward_only():
        lm.logits(x)

    @torch.inference_mode()
    def floor():  # the unavoidable work: hidden states, then every state through the unembedding
        resid, _ = lm.hidden_states(x)
        for h in resid:
            lm.decode(h)

    def analysis(lens_dtype):
        return lambda: analyze_model(lm, [windows], LensOptions(lens_dtype=lens_dtype), progress=False)

    forward_only()  # warm-up: allocator, thread pool
    paths = {"forward only: lm.logits": forward_only,
             f"floor: hidden states + {lm.n_layer + 1} lens matmuls, no metrics": floor,
             "analyze_model, float32 lens (default)": analysis("auto"),
             "analyze_model, bfloat16 lens (--lens_dtype=bfloat16)": analysis("bfloat16")}
    wall, cpu = ({name: float("inf") for name in paths} for _ in range(2))  # CPU time: less noise from neighbours
    for _ in range(repeats):
        for name, run in paths.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name] = min(wall[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    forward = "forward only: lm.logits"
    rows = [[name, f"{B * T / wall[name]:,.0f}", f"{wall[name] / wall[forward]:.2f}x", f"{cpu[name] / cpu[forward]:.2f}x"]
            for name in paths]

    memory_rows = []
    for n in memory_sequences:
        result = subprocess.run([sys.executable, "-c", _ANALYZE_MEMORY_PROBE, str(n), str(T), str(B)],
                                capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)))
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        memory_rows.append([n, f"{n * T:,}", B, f"{probe['baseline_kib'] / 1024:.0f}", f"{probe['peak_kib'] / 1024:.0f}",
                            f"{(probe['peak_kib'] - probe['baseline_kib']) / 1024:.0f}"])

    print(f"### analyze: layerwise metrics vs a plain forward, GPT-2 124M shape, float32, {B} x {T} tokens, "
          f"{torch.get_num_threads()} torch threads, best of {repeats}\n")
    print(markdown_table(["path", "tokens/s (wall)", "time vs forward (wall)", "(CPU time)"], rows))
    print("\n### analyze: peak memory (RSS, MiB, a fresh process per row)\n")
    print(markdown_table(["sequences", "tokens", "batch", "before the analysis", "peak during it", "added"],
                         memory_rows))


# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# threads: the demo's training step idle and next to a busy neighbour

_DEMO_STEP_PROBE = """
import statistics, sys, time
import torch
from nanoshift.common import set_threads
from model import GPT, GPTConfig
threads, steps = int(sys.argv[1]), int(sys.argv[2])
used = set_threads(threads)
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=6, n_head=4, n_embd=128, block_size=128, vocab_size=50304))  # config/demo.py
optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
x = torch.randint(0, 50257, (4, 129), generator=torch.Generator().manual_seed(0))
times = []
for step in range(steps + 2):  # 2 warm-up steps
    start = time.perf_counter()
    for micro in range(4):  # 4 micro-steps of 1 x 128 tokens: one optimizer step of the demo
        _, loss = model(x[micro:micro + 1, :-1], x[micro:micro + 1, 1:])
        (loss / 4).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
print(used, statistics.median(times[2:]))
"""
_BUSY_LOOP = "while True: pass"


def bench_threads(steps=6, rounds=2):
    """The demo's training step (config/demo.py's model and batch) in wall seconds, on an idle machine and
    with one competing CPU-bound process (a Python busy loop), for the default thread count (threads=0:
    half the cores, or OMP_NUM_THREADS) and for one thread per core. Rounds alternate idle and loaded, and
    each figure is the median step of a fresh process; the ratio loaded / idle is what a busy machine costs."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let threads=0 choose

    def step_seconds(threads):
        result = subprocess.run([sys.executable, "-c", _DEMO_STEP_PROBE, str(threads), str(steps)], cwd=here,
                                env=env, capture_output=True, text=True, check=True)
        used, seconds = result.stdout.split()
        return int(used), float(seconds)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {"threads=0 (default)": 0, f"threads={cores} (one per core)": cores}
    figures = {(name, load): [] for name in settings for load in ("idle", "loaded")}
    used = {}
    for _ in range(rounds):
        for load in ("idle", "loaded"):
            busy = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP]) if load == "loaded" else None
            try:
                for name, threads in settings.items():
                    used[name], seconds = step_seconds(threads)
                    figures[(name, load)].append(seconds)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    rows = []
    for name in settings:
        idle, loaded = (statistics.median(figures[(name, load)]) for load in ("idle", "loaded"))
        rows.append([name, used[name], f"{idle:.3f}", f"{loaded:.3f}", f"{loaded / idle:.2f}x"])
    print(f"### threads: the demo's training step (6 x 128, 4 x 128 tokens), {cores} cores, median of "
          f"{steps} steps, {rounds} rounds\n")
    print(markdown_table(["setting", "torch threads", "s/step idle", "s/step with 1 busy process",
                          "loaded / idle"], rows))


# -----------------------------------------------------------------------------
# tracking: what alignment tracking at every eval costs a training run


def bench_tracking(repeats=3):
    """Training time with alignment tracking on vs off at train.py's default settings (GPT-2 124M shape,
    track_sequences=16 windows of 1024 tokens at every eval_interval=250 steps of 2**19 tokens).

    A default run cannot train on a CPU, so the ratio is built from two timings measured here, in one
    process, best of `repeats`: one tracking pass (raw + normed space, as train.py does) over 1 window,
    scaled by 16 windows, and one training step (forward, backward, AdamW) over 1 x 1024 tokens, scaled by
    the 250 x 2**19 tokens between two evals. Both costs are linear in tokens, so the extrapolation holds
    where the per-token speeds do; on a GPU the tracking's share is smaller still (it runs in float32
    eager mode, but it is ~0.01% of the tokens).
    """
    torch.manual_seed(0)
    model = GPT(GPTConfig())  # GPT-2 124M shape
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    window = torch.randint(0, 50257, (1, 1025), generator=torch.Generator().manual_seed(0))

    def train_step():
        _, loss = model(window[:, :-1], window[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def track_one_window():
        lens_sums(OurGPT(model, "gpt2-124M-shape"), [window], spaces=("raw", "normed"))  # as train.py does
        model.train()

    best = {"train": float("inf"), "track": float("inf")}
    train_step()  # warm-up
    for _ in range(repeats):
        for name, run in (("train", train_step), ("track", track_one_window)):
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    eval_interval, step_tokens, windows = 250, 2**19, 16
    train_seconds = best["train"] / 1024 * step_tokens * eval_interval
    track_seconds = best["track"] * windows
    rows = [["1 training step, 1 x 1024 tokens", f"{best['train']:.2f}"],
            ["tracking, 1 window (raw + normed)", f"{best['track']:.2f}"],
            [f"training between two evals ({eval_interval} x {step_tokens:,} tokens, scaled)", f"{train_seconds:,.0f}"],
            [f"tracking at one eval ({windows} windows, scaled)", f"{track_seconds:,.0f}"]]
    print(f"### tracking: alignment tracking at train.py's defaults, GPT-2 124M shape, float32, "
          f"{torch.get_num_threads()} torch threads, best of {repeats}\n")
    print(markdown_table(["what", "seconds"], rows))
    print(f"\ntraining time with tracking on / off: {(train_seconds + track_seconds) / train_seconds:.5f} (target <= 1.03)")


# -----------------------------------------------------------------------------
# fsdp: what each rank holds, and how fast it steps, with DDP and with FSDP (train.py itself under torchrun)

# CPU: 2 ranks (gloo) of a small GPT-2 (4 x 256, GPT-2's vocabulary), 4 x 64 tokens per rank per step, float32
_FSDP_CPU = dict(nproc=2, steps=30, step_tokens=512, args=[
    "--device=cpu", "--n_layer=4", "--n_head=4", "--n_embd=256", "--block_size=64", "--batch_size=4",
    "--total_batch_tokens=512", "--eval_tokens=512", "--warmup_iters=5", "--dtype=float32", "--compile=False"])
# GPU: config/fsdp_350m.py (GPT-2 medium's shape, bf16, torch.compile) on one GPU, 2 micro-steps of 16 x 1024 tokens
_FSDP_GPU = dict(nproc=1, steps=300, step_tokens=32768, args=[
    "config/fsdp_350m.py", "--total_batch_tokens=32768", "--eval_tokens=16384", "--warmup_iters=30"])


def _random_token_shards(folder, train_tokens, val_tokens):
    """Uniformly random GPT-2 token ids as a train and a val shard: speed and memory do not depend on the text,
    and nothing needs downloading (train.py reads them with require_manifest=False)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        write_shard(os.path.join(folder, shard_name("random", split, 0)), rng.integers(0, 50257, n, dtype=np.uint16))


def fsdp_comparison(runs, warmup_steps):
    """{'ddp': out_dir, 'fsdp': out_dir} of two train.py runs of one model -> (markdown table, the FSDP / DDP
    ratio of the bytes a rank holds). Held bytes: weights + gradients + AdamW state per rank, as train.py logs
    them (counted from the tensors' local shards); peaks: the process's max RSS and, on a GPU,
    torch.cuda.max_memory_allocated; speed: medians over the train rows after warmup_steps."""
    mib = lambda n: f"{n / 2**20:,.1f}"
    held, rows = {}, []
    for name, out in runs.items():
        log = read_jsonl(os.path.join(out, "log.jsonl"))
        train = [r for r in log if r["type"] == "train"][warmup_steps:]
        memory = [r for r in log if r["type"] == "end"][-1]["memory"]
        held[name] = [m["params"] + m["grads"] + m["optimizer"] for m in memory]
        ms = statistics.median(r["dt_ms"] for r in train)
        speed = statistics.median(r["tokens_per_sec"] for r in train)
        mfu = [r["mfu"] for r in train if r["mfu"] is not None]
        for m, total in zip(memory, held[name]):
            cuda = m["cuda_max_allocated_mib"]
            rows.append([name, m["rank"], mib(m["params"]), mib(m["grads"]), mib(m["optimizer"]), mib(total),
                         f"{total / max(held['ddp']):.2f}" if "ddp" in held else "", f"{m['max_rss_mib']:,.0f}",
                         "" if cuda is None else f"{cuda:,.0f}", f"{ms:,.1f}", f"{speed:,.0f}",
                         f"{statistics.median(mfu):.1%}" if mfu else ""])
    table = markdown_table(["parallelism", "rank", "weights MiB", "gradients MiB", "AdamW MiB", "held MiB",
                            "held vs DDP", "peak RSS MiB", "peak CUDA MiB", "ms / step", "tokens/s", "MFU"], rows,
                           align=["left"] + ["right"] * 11)
    return table, max(held["fsdp"]) / max(held["ddp"])


def bench_fsdp(table_out=""):
    """The same model and batch trained with parallelism='ddp' and 'fsdp' by train.py under torchrun, on random
    tokens: per rank, the bytes of weights, gradients and AdamW state it holds, its peak memory, and the step
    time. CPU: 2 ranks over gloo, a small model (FSDP halves what each rank holds; on a CPU the collectives
    cost more than the compute, so FSDP is slower). GPU: config/fsdp_350m.py on one GPU, bf16 and
    torch.compile, a few hundred steps: one rank shards nothing, so this measures FSDP's overhead against DDP
    (memory and speed), not its savings (docs/sharded-training.md has the per-rank arithmetic)."""
    cuda = torch.cuda.is_available()
    plan = _FSDP_GPU if cuda else _FSDP_CPU
    warmup = 20 if cuda else 5  # compilation and the allocator's first steps
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        _random_token_shards(tmp, (plan["steps"] + 1) * plan["step_tokens"] + 1, 4 * plan["step_tokens"] + 1)
        runs = {}
        for parallelism in ("ddp", "fsdp"):
            runs[parallelism] = os.path.join(tmp, parallelism)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={plan['nproc']}",
                   "train.py", *plan["args"], f"--parallelism={parallelism}", f"--data_dir={tmp}",
                   f"--out_dir={runs[parallelism]}", f"--max_iters={plan['steps']}", f"--eval_interval={plan['steps']}",
                   "--require_manifest=False", "--track_alignment=False", "--log_interval=1"]
            result = subprocess.run(cmd, cwd=here, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                                    text=True)
            if result.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n"
                                   f"{result.stderr[-3000:]}")
        table, ratio = fsdp_comparison(runs, warmup)
    where = f"{plan['nproc']} x {_device_name('cuda') if cuda else _device_name('cpu') + ' (gloo)'}"
    model = "config/fsdp_350m.py (24 x 1024, 354.9M parameters), bf16, torch.compile" if cuda else \
        "GPT-2 4 x 256 (16.0M parameters with its 50304-token vocabulary), float32"
    text = (f"### fsdp: DDP vs FSDP per rank, {where}, torch {torch.__version__}\n\n{model}; "
            f"{plan['step_tokens']:,} tokens per step, {plan['steps']} steps, medians after {warmup}\n\n{table}\n\n"
            f"held bytes per rank, FSDP / DDP: {ratio:.3f}\n")
    print(text)
    if table_out:
        write_text(table_out, f"machine: {machine_description()}\n\n{text}")
    return ratio


# (n_layer, n_embd, n_head) of model.py's gpt2 arch with GPT-2's vocabulary: GPT-2 small, and the depth at the
# widths of Llama-3.2-1B / -3B and Llama-2-7B (2048, 3072, 4096) that comes closest to 1B, 3B and 7B parameters
_MEMORY_MODELS = {"124M": (12, 768, 12), "1B": (18, 2048, 16), "3B": (26, 3072, 24), "7B": (32, 4096, 32)}


def fsdp_memory_arithmetic(micro_batch=4, seq_len=2048, vocab_size=50304):
    """Per-rank memory of training with DDP and with FSDP on 8 and 32 GPUs, computed (not measured) from the
    parameter counts of model.py, bf16 compute, float32 master weights, gradients and AdamW. Rows of
    [model, parameters, setup, weights, gradients, AdamW, transient, activations, activations with
    activation_checkpointing, total with checkpointing] in GiB (docs/sharded-training.md says what each is).
      DDP: weights 4N, gradients 4N, AdamW 8N; transient 2N (autocast's bf16 weight copies, kept for the
        backward pass) + 4N (DDP's gradient buckets).
      FSDP on W ranks: 4N/W, 4N/W, 8N/W; transient: the gathered bf16 root (embeddings, final norm, lm_head,
        gate: 2 bytes x its parameters) + two gathered bf16 blocks (the one running, the next prefetched)
        + one block's unsharded float32 gradient before its reduce-scatter.
      Activations of a micro-batch of B x T tokens (Korthikanti et al. 2022, attention by SDPA, which stores no
        T x T scores): 34 B T d bytes per block + 10 B T V for the logits (bf16, their float32 copy and the
        log-softmax the loss keeps); with activation checkpointing each block keeps only its input (2 B T d
        bytes under FSDP's bf16 residual stream, 4 under DDP's float32 autocast one) and one block at a time is
        recomputed (34 B T d).
    Gradient accumulation under FSDP with fsdp_reshard_micro_steps=False adds 2N (gathered weights) + 4N
    (unsharded float32 gradients) during a step: not in this table."""
    gib = lambda n: n / 2**30
    B, T, V = micro_batch, seq_len, vocab_size
    rows = []
    for name, (L, d, heads) in _MEMORY_MODELS.items():
        with torch.device("meta"):
            model = GPT(GPTConfig(n_layer=L, n_embd=d, n_head=heads, block_size=T, vocab_size=V))
        N = model.num_params(non_embedding=False)
        block = sum(p.numel() for p in model.transformer.h[0].parameters())
        root = N - L * block
        logits = 10 * B * T * V
        for setup, world in (("DDP", 1), ("FSDP, 8 GPUs", 8), ("FSDP, 32 GPUs", 32)):
            fsdp = world > 1
            transient = 2 * root + 2 * 2 * block + 4 * block if fsdp else 2 * N + 4 * N
            activations = 34 * B * T * d * L + logits
            checkpointed = (2 if fsdp else 4) * B * T * d * L + 34 * B * T * d + logits
            states = 16 * N / world
            rows.append([name, N, setup, gib(4 * N / world), gib(4 * N / world), gib(8 * N / world), gib(transient),
                         gib(activations), gib(checkpointed), gib(states + transient + checkpointed)])
    return rows


def bench_fsdp_memory():
    """docs/sharded-training.md's per-rank memory table (fsdp_memory_arithmetic), printed as markdown."""
    B, T = 4, 2048
    rows = [[name, f"{n / 1e9:.2f}B", setup, *(f"{x:,.1f}" for x in numbers)]
            for name, n, setup, *numbers in fsdp_memory_arithmetic(B, T)]
    print(f"### fsdp_memory: per-rank memory in GiB, bf16 compute, float32 weights / gradients / AdamW, micro-batch "
          f"{B} x {T} tokens, GPT-2 vocabulary (computed from model.py's parameter counts, not measured)\n")
    print(markdown_table(["model", "parameters", "setup", "weights", "gradients", "AdamW", "transient",
                          "activations", "activations, checkpointed", "total, checkpointed"], rows,
                         align=["left"] * 3 + ["right"] * 7))


def bench_tuned_lens_costs(B=4, T=128, steps=2, repeats=2):
    """The tuned lens's costs (tuned_lens.bench_tuned_lens, one run): translator training tokens/s with the
    tuned-lens recipe, and analyze_model under the tuned lens against the logit lens, on config/demo.py's model
    shape (random weights, GPT-2 vocabulary), float32, `steps` training steps of B x T tokens."""
    torch.manual_seed(0)
    lm = OurGPT(GPT(GPTConfig(n_layer=6, n_head=4, n_embd=128, block_size=T, vocab_size=50304)), "demo-shape")
    windows = torch.randint(0, 50257, (B * steps, T + 1), generator=torch.Generator().manual_seed(0))
    n = bench_tuned_lens(lm, windows, steps=steps, batch_size=B, repeats=repeats)
    full = REFERENCE_STEPS * REFERENCE_TOKENS_PER_STEP
    print(f"### tuned_lens: translator training and the tuned analysis vs the logit lens, config/demo.py's shape, "
          f"float32, {B * steps} x {T} tokens, {torch.get_num_threads()} torch threads\n")
    print(markdown_table(["path", "tokens/s", "time per token vs the logit-lens analysis"], [
        ["analyze_model, logit lens", f"{n['logit_analysis_tokens_per_s']:,.0f}", "1.00x"],
        ["analyze_model, tuned lens", f"{n['tuned_analysis_tokens_per_s']:,.0f}", f"{n['tuned_vs_logit_analysis']:.2f}x"],
        ["translator training (SGD-Nesterov, KL to the final layer)", f"{n['train_tokens_per_s']:,.0f}",
         f"{n['train_vs_logit_analysis']:.2f}x"]]))
    print(f"\nThe package's full recipe ({REFERENCE_STEPS} steps of {REFERENCE_TOKENS_PER_STEP:,} tokens) would take "
          f"{full / n['train_tokens_per_s'] / 3600:,.1f} h at this speed; analyze.py's CPU default ({REFERENCE_STEPS} steps "
          f"of {CPU_TOKENS_PER_STEP} tokens) {REFERENCE_STEPS * CPU_TOKENS_PER_STEP / n['train_tokens_per_s'] / 60:,.1f} min.")


# -----------------------------------------------------------------------------
# recipe: which CPU training recipe learns the demo corpus fastest (issue 22)

# the reference row: karpathy/nanoGPT's documented CPU recipe, trained as configured (its own 2,000 steps)
RECIPE_REFERENCE = "nanoGPT CPU recipe: bytes, 4 x 128, ctx 64, 768 tok/step, lr 1e-3"
# label -> train.py arguments; every row but the reference trains for the same budget of training seconds
RECIPE_CANDIDATES = {
    RECIPE_REFERENCE: ["config/recipe_nanogpt.py"],
    "bytes, 6 x 128, ctx 128, 1,024 tok/step, lr 2e-3": ["config/recipe_bytes.py"],
    "bytes, 6 x 128, ctx 128, 1,024 tok/step, lr 2e-3, 2 threads": ["config/recipe_bytes.py", "--threads=2"],
    "BPE-4096, 4 x 128, ctx 64, 768 tok/step, lr 1e-3 (nanoGPT's)": [
        "config/recipe_bpe.py", "--n_layer=4", "--block_size=64", "--batch_size=12", "--total_batch_tokens=768",
        "--learning_rate=1e-3", "--min_lr=1e-4"],
    "BPE-4096, 6 x 128, ctx 128, 1,024 tok/step, lr 2e-3": ["config/recipe_bpe.py"],
    "BPE-4096, 6 x 128, ctx 128, 1,024 tok/step, lr 2e-3, 2 threads": ["config/recipe_bpe.py", "--threads=2"],
    "BPE-4096, 6 x 128, ctx 128, 2,048 tok/step, lr 3e-3": [
        "config/recipe_bpe.py", "--batch_size=16", "--total_batch_tokens=2048", "--learning_rate=3e-3",
        "--min_lr=3e-4"],
    "BPE-4096, 6 x 128, ctx 128, 1,024 tok/step, lr 2e-3, wsd": ["config/recipe_bpe.py", "--lr_schedule=wsd"],
    "GPT-2 vocab, 6 x 128, ctx 128, 1,024 tok/step, lr 2e-3": ["config/recipe_gpt2.py"],
    "GPT-2 vocab, the old demo: 6 x 128, 512 tok/step, lr 3e-3": [
        "config/recipe_gpt2.py", "--batch_size=4", "--total_batch_tokens=512", "--learning_rate=3e-3",
        "--min_lr=3e-4", "--warmup_iters=20"],
}
# how each data folder the candidates read is made, when it is missing
RECIPE_PREPARE = {
    "data/demo_bytes": ["prepare_fineweb.py", "--demo", "--tokenizer=bytes", "--out_dir=data/demo_bytes"],
    "data/repro": ["reproduce.py", "--steps=prepare", "--tokenizer=data/repro-tokenizer", "--data_dir=data/repro"],  # fits the BPE first
    "data/demo": ["prepare_fineweb.py", "--demo"],
}


def _recipe_settings(args):
    """train.py's resolved settings for a candidate's arguments (config files and overrides)."""
    return configure(with_registry_settings(train.DEFAULTS), args)


def _recipe_train(args, out_dir, here, env):
    """One train.py process -> (log rows, wall seconds); a failure raises with the end of its output."""
    cmd = [sys.executable, "train.py", *args, f"--out_dir={out_dir}", "--init_from=scratch", "--overwrite=True",
           "--log_interval=1", "--track_alignment=False", "--save_best=False", "--save_optimizer_at_end=False"]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=here, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-2000:]}")
    return read_jsonl(os.path.join(out_dir, "log.jsonl")), wall


def _recipe_eval_tokens(floors, eval_bytes):
    """Val tokens covering about eval_bytes of text in this tokenization (the first ones of the val split: the
    same text for every candidate); eval_bytes=0: the whole val split."""
    if eval_bytes == 0:
        return floors["val_targets"]
    return max(1, math.ceil(eval_bytes * floors["val_targets"] / floors["val_bytes"]))


def bench_recipe(seconds=0, candidates=None, reference=RECIPE_REFERENCE, eval_bytes=2**17, probe_steps=8):
    """Val bits per byte against training time for CPU recipes on the demo corpus, one train.py process after
    the other, side by side in one run, with the unigram and bigram floors of every tokenization as
    reference rows.

    The reference (nanoGPT's CPU recipe) trains as configured; every other candidate trains for `seconds` of
    optimizer steps (0: the reference's measured training seconds, so that all rows are at equal time): a
    short probe run of `probe_steps` steps measures its step time, and the run gets that many seconds' worth
    of steps as max_iters, so its learning-rate schedule ends where its budget does. The table reports the
    training seconds actually spent (the sum of the steps' dt_ms), the process's wall time (start-up and the
    two evals included) and the tokens seen. Every run evaluates on the first eval_bytes of the val split's
    text (the same text in every tokenization; 0 = the whole val split) at its last step.
    candidates: {label: train.py arguments} (default RECIPE_CANDIDATES); reference: the label that trains
    as configured (None or absent: none does, and seconds must be > 0). Returns the table's rows as dicts."""
    candidates = RECIPE_CANDIDATES if candidates is None else candidates
    if seconds < 0 or eval_bytes < 0 or probe_steps < 3:
        raise SettingError(f"need seconds >= 0, eval_bytes >= 0 and probe_steps >= 3, got {seconds}, {eval_bytes}, "
                           f"{probe_steps}")
    if seconds == 0 and reference not in candidates:
        raise SettingError("seconds=0 means 'the reference's training time', but no reference row is among the "
                           "candidates: give a budget in seconds")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # each run sets its own threads
    settings = {label: _recipe_settings(args) for label, args in candidates.items()}
    floors = {}
    for c in settings.values():
        data_dir = c["data_dir"]
        if data_dir in floors:
            continue
        if read_manifest(os.path.join(here, data_dir)) is None:
            if data_dir not in RECIPE_PREPARE:
                raise SettingError(f"data_dir={data_dir!r} holds no finished prepare, and bench.py does not know "
                                   f"how to make it (it knows {sorted(RECIPE_PREPARE)})")
            print(f"recipe: preparing {data_dir}: {' '.join(RECIPE_PREPARE[data_dir])}")
            subprocess.run([sys.executable, *RECIPE_PREPARE[data_dir]], cwd=here, env=env, check=True,
                           capture_output=True)
        floors[data_dir] = data_floors(os.path.join(here, data_dir))
    order = ([reference] if reference in candidates else []) + [label for label in candidates if label != reference]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, label in enumerate(order):
            c, args = settings[label], list(candidates[label])
            eval_tokens = _recipe_eval_tokens(floors[c["data_dir"]], eval_bytes)
            out_dir = os.path.join(tmp, f"run{i}")
            if label == reference:
                steps = c["max_iters"]
                args += [f"--eval_interval={steps}"]
            else:
                probe, _ = _recipe_train(args + [f"--max_iters={probe_steps}", "--warmup_iters=0", "--lr_decay_iters=0",
                                                 f"--eval_interval={probe_steps}", "--eval_tokens=1"],
                                         os.path.join(tmp, f"probe{i}"), here, env)
                step_s = statistics.median(r["dt_ms"] for r in probe if r["type"] == "train" and r["iter"] >= 2) / 1000
                budget = seconds or rows[0]["train_s"]
                steps = max(2, int(budget / step_s))
                args += [f"--max_iters={steps}", "--lr_decay_iters=0", f"--warmup_iters={min(c['warmup_iters'], steps // 5)}",
                         f"--eval_interval={steps}"]
            log, wall = _recipe_train(args + [f"--eval_tokens={eval_tokens}"], out_dir, here, env)
            last = [r for r in log if r["type"] == "eval"][-1]
            run_row = log[0]
            fl = floors[c["data_dir"]]
            rows.append({
                "label": label, "tokenizer": fl["tokenizer"], "threads": run_row["threads"], "steps": last["iter"],
                "tokens": last["tokens"], "train_s": sum(r["dt_ms"] for r in log if r["type"] == "train") / 1000,
                "wall_s": wall, "val_loss": last["val_loss"], "val_bpb": last["val_bpb"],
                "below_bigram": fl["bigram"]["bpb"] - last["val_bpb"], "n_params": run_row["n_params"],
                "eval_tokens": run_row["eval_tokens"]})
            print(f"recipe: {label}: {rows[-1]['steps']} steps, {rows[-1]['train_s']:.0f} s, "
                  f"{rows[-1]['val_bpb']:.4f} bits/byte", flush=True)
    table = [[r["label"], r["tokenizer"], f"{r['n_params'] / 1e6:.2f}M", r["threads"], f"{r['steps']:,}",
              f"{r['tokens']:,}", f"{r['train_s']:.0f}", f"{r['wall_s']:.0f}", f"{r['val_loss']:.4f}",
              f"{r['val_bpb']:.4f}", f"{r['below_bigram']:+.3f}"] for r in rows]
    for data_dir, fl in floors.items():
        for order_name in ("unigram", "bigram"):
            table.append([f"{order_name} floor of {data_dir} (counted on its train split)", fl["tokenizer"], "", "", "",
                          f"{fl['train_tokens']:,}", "", "", f"{fl[order_name]['nats']:.4f}", f"{fl[order_name]['bpb']:.4f}",
                          f"{fl['bigram']['bpb'] - fl[order_name]['bpb']:+.3f}"])
    budget = f"{seconds:g} s" if seconds else "the reference's training time"
    print(f"### recipe: val bits per byte on the demo corpus after equal training time ({budget} each; the reference "
          f"trains its own {settings[reference]['max_iters'] if reference in settings else 0:,} steps), evaluated on "
          f"the first {eval_bytes:,} bytes of the val split (0 = all), one run at a time, torch "
          f"{torch.__version__}\n")
    print(markdown_table(["candidate", "tokenizer", "parameters", "threads", "steps", "tokens seen", "train s", "wall s",
                          "val nats/token", "val bits/byte", "below own bigram floor (bits/byte)"], table,
                         align=["left", "left"] + ["right"] * 9))
    return rows


# fsdp_init: per-rank peak host memory while building a model for FSDP (2 gloo ranks): built whole and then
# sharded (the path before meta-device init, still parallel.shard's path for a model built whole) against built
# on the meta device and materialised shard by shard (train.py's path for fsdp scratch runs)
_FSDP_INIT_WORKER = """
import json, resource, sys, time
import torch, torch.distributed as dist
from model import GPT, GPTConfig
from nanoshift import parallel
from nanoshift.run import RunFacts
path, config = sys.argv[1], GPTConfig(**json.loads(sys.argv[2]))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
facts = RunFacts(init_from="scratch", torchrun=True, distributed=True, fsdp=True, rank=rank, local_rank=rank,
                 world_size=world, device="cpu", device_type="cpu", dtype="float32", use_compile=False,
                 grad_accum_steps=1, micro_tokens=0)
with torch.device("meta"):  # the libraries a first model build loads (as any train.py process has by then)
    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=8, block_size=8))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports and the process group (KiB -> MiB)
torch.manual_seed(1337 + rank)  # as train.py seeds each rank
t0 = time.time()
if path == "meta":
    with torch.device("meta"):
        model = GPT(config)
else:
    model = GPT(config)
parallel.place(model, facts, scratch=True, seed=1337)
row = dict(rank=rank, base_mib=base, peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           seconds=time.time() - t0, shard_mib=parallel.local_bytes(model.parameters()) / 2**20,
           n_params=sum(p.numel() for p in model.parameters()))
rows = [None] * world
dist.all_gather_object(rows, row)
if rank == 0:
    print("ROWS " + json.dumps(rows))
dist.barrier()
dist.destroy_process_group()
"""


def _mem_available_bytes():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def bench_fsdp_init():
    """Per-rank peak host memory (max RSS) while building a GPT for FSDP with 2 gloo ranks on the CPU, the
    model built whole and then sharded (each rank: the whole float32 model, its shard, and on rank 0 a copy of
    the whole state dict to broadcast) against built on the meta device and materialised shard by shard (each
    rank: its shard plus one module replayed at a time). About 1B parameters (GPT-2 vocabulary, 18 x 2048); with
    less free memory than the whole-build path needs (about 4x the model's float32 bytes over both ranks, plus
    4 GiB left to the rest of the machine), ~500M (12 x 1792) instead, and the table says so. Large buffers are
    mapped on their own (MALLOC_MMAP_THRESHOLD_), so the peaks are what each rank held, not heap left-overs."""
    gib = 2**30
    shapes = {"1B": dict(n_layer=18, n_embd=2048, n_head=16), "500M": dict(n_layer=12, n_embd=1792, n_head=14)}
    size = "1B" if _mem_available_bytes() >= 4 * 4.05e9 + 4 * gib else "500M"
    config = dict(shapes[size], vocab_size=50304, block_size=1024)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = {}
    for path in ("whole", "meta"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
               sys.executable, "-c", _FSDP_INIT_WORKER, path, json.dumps(config)]
        result = subprocess.run(cmd, cwd=here, env=env, capture_output=True, text=True)
        found = [line for line in result.stdout.splitlines() if line.startswith("ROWS ")]
        if result.returncode or not found:
            raise RuntimeError(f"fsdp_init ({path}) failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        results[path] = json.loads(found[0][5:])
    n_params = results["meta"][0]["n_params"]
    full_mib = 4 * n_params / 2**20
    rows = []
    for path, label in (("whole", "built whole, then sharded (before)"), ("meta", "meta device, shard by shard")):
        for r in results[path]:
            grown = r["peak_mib"] - r["base_mib"]
            rows.append([label, r["rank"], f"{r['shard_mib']:,.0f}", f"{r['base_mib']:,.0f}", f"{r['peak_mib']:,.0f}",
                         f"{grown:,.0f}", f"{grown / full_mib:.2f}", f"{r['seconds']:,.1f}"])
    print(f"### fsdp_init: per-rank peak host memory while building a {n_params / 1e9:.2f}B-parameter GPT-2 "
          f"({config['n_layer']} x {config['n_embd']}, vocabulary {config['vocab_size']}) for FSDP, 2 gloo ranks, "
          f"float32 ({full_mib:,.0f} MiB whole)" + ("" if size == "1B" else
                                                    "; ~500M, not 1B: too little free memory for the whole build"))
    print()
    print(markdown_table(["path", "rank", "shard MiB", "RSS before MiB", "peak RSS MiB", "grown MiB",
                          "grown / whole model", "seconds"], rows, align=["left"] + ["right"] * 7))
    worst = max(r["peak_mib"] - r["base_mib"] for r in results["meta"]) / full_mib
    print(f"\nmeta device: the most any rank grew while building = {worst:.2f} x the whole model's float32 bytes "
          f"(target <= 0.6)")
    return worst

SECTIONS = {
    "data": bench_data,
    "train": bench_train,
    "train_llama": bench_train_llama,
    "analyze": bench_analyze,
    "eval": bench_eval,
    "threads": bench_threads,
    "tracking": bench_tracking,
    "fsdp": bench_fsdp,
    "fsdp_memory": bench_fsdp_memory,
    "tuned_lens": bench_tuned_lens_costs,
    "recipe": bench_recipe,
    "fsdp_init": bench_fsdp_init,
}

DEFAULTS = dict(
    section="all",  # which: all | data | train | train_llama | analyze | eval | threads | tracking | fsdp | fsdp_memory | tuned_lens | recipe, fsdp_init (long: not in all)
    table_out="",  # fsdp: also write its table (markdown) to this file
    repeats=0,  # train: rounds per residual variant; 0 = the section's default (13)
    tiny=False,  # train: a 2-layer x 32 model instead of the GPT-2-like shape (checks every variant runs, in seconds)
    recipe_seconds=0,  # recipe: training seconds per candidate; 0 = the nanoGPT reference row's own training time
    recipe_eval_bytes=2**17,  # recipe: every candidate is evaluated on the first this-many bytes of val text (0 = all)
)
LONG_SECTIONS = ("recipe", "fsdp_init")  # left out of section=all: run them alone (recipe ~30 min; fsdp_init ~16 GB)


def run(argv):
    settings = configure(DEFAULTS, argv, help_from=__file__)
    section = settings["section"]
    if section != "all" and section not in SECTIONS:
        raise SettingError(f"unknown section={section!r}; choose from {list(SECTIONS) + ['all']}")
    if settings["table_out"] and section != "fsdp":
        raise SettingError("table_out is written by --section=fsdp only")
    print(f"machine: {machine_description()}\n")
    for name in ([n for n in SECTIONS if n not in LONG_SECTIONS] if section == "all" else [section]):
        kwargs = {"table_out": settings["table_out"]} if name == "fsdp" else {}
        if name == "recipe":
            kwargs = dict(seconds=settings["recipe_seconds"], eval_bytes=settings["recipe_eval_bytes"])
        if name == "train":
            kwargs = dict(tiny=settings["tiny"], **({"repeats": settings["repeats"]} if settings["repeats"] else {}))
        SECTIONS[name](**kwargs)
        print()


if __name__ == "__main__":
    run_main(run, sys.argv[1:])

