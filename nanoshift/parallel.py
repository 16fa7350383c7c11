"""
Parallelism in one place: the process group, DDP or FSDP2 wrapping, gathering, and the collectives a training
step needs. train.py calls these; nothing else in the project knows how the model is distributed.

    init_process_group(facts)                       # torchrun: NCCL (GPUs) or gloo (CPU); fsdp alone: a group of one
    model = wrap(raw_model, facts, scratch=True)    # fsdp: shard per block, then the root; ddp: compile, DDP

Sharded training (parallelism='fsdp'): PyTorch's FSDP2 (fully_shard) shards every block and then the root
(embeddings, final norm, output layer and the residual gate, which every block reads and which is gathered
once per step with the embeddings), so each rank holds 1/world_size of the weights, gradients and AdamW
state. bfloat16 runs gather weights in bfloat16 and reduce gradients in float32 (MixedPrecisionPolicy; the
master weights and AdamW stay float32); float16 is refused (loss scaling over sharded gradients is not
supported here). torch.compile compiles each block. Gradient accumulation keeps the gathered weights and
unsharded float32 gradients between micro-steps and reduce-scatters once per step
(fsdp_reshard_micro_steps=True: every micro-step, for the least memory). `python train.py --parallelism=fsdp`
without torchrun runs a 1-rank group (nothing is sharded: for testing). A sharded checkpoint
(nanoshift/checkpoint.py) resumes on any number of ranks: weights, AdamW state and the data stream continue
exactly; with another world size the per-rank dropout masks differ and the float sums of the gradient
reduction run in another order (so losses agree to float precision, not bit for bit). A DDP ckpt.pt resumes as FSDP and a
sharded checkpoint as DDP (load_resumed; the conversion is bit-exact).

Meta-device init: train.py builds an fsdp scratch, resume or retrofit model on the meta device (no memory);
shard() shards it, allocates each rank's shards (to_empty) and, from scratch, replays GPT.__init__'s random draws
one module at a time (replay_scratch_init), each rank keeping its part (a retrofit reads its pretrained weights
one tensor at a time instead: load_pretrained_shards): no rank ever holds the whole float32 model,
the weights equal DDP's (rank 0's init) bit for bit, and every rank's RNG ends as under DDP
(docs/sharded-training.md, "Building the model").
"""

import copy
import dataclasses
import functools
import itertools
import math
import os
import resource

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, RESIDUALS, SCALED_INIT_SUFFIXES, RMSNorm, scaled_init_std
from nanoshift import checkpoint, hf


def init_process_group(facts):
    """The process group, once every setting, the data and the model were checked (so a bad setting never
    leaves other ranks waiting)."""
    if not facts.distributed:
        return
    if facts.device_type == "cuda":
        torch.cuda.set_device(facts.device)
    backend = "nccl" if facts.device_type == "cuda" else "gloo"
    if facts.torchrun:
        dist.init_process_group(backend=backend)
    else:  # fsdp in one plain process: a group of one, in memory
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        print("note: parallelism='fsdp' without torchrun: a 1-rank process group, nothing is sharded")


def shard(model, facts, scratch, seed=None):
    """FSDP2: each block its own unit (gathered just before it runs, freed after), then the root (embeddings,
    final norm, lm_head and the gate: the gate is read before the first block and every block's backward adds
    to its gradient, so it is gathered with the embeddings once per step and reduce-scattered after the last
    block's backward). Weights are gathered in the compute dtype and gradients reduced in float32, while the
    sharded master weights and AdamW state stay float32. Moves the local shards to the device.

    A model built on the meta device (train.py's fsdp scratch and resume runs) is sharded first and then
    materialised, each rank allocating its shards only: scratch weights are replayed shard by shard
    (init_scratch_shards: equal to rank 0's plain init from `seed`), a resume's are loaded after this returns.
    A retrofit built on the meta device (pretrained safetensors weights) loads them shard by shard here
    (load_pretrained_shards). A model built whole (a retrofit from .bin weights or a hub name, or the old path)
    is sharded as it is; a scratch one then takes rank 0's weights, as under DDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    meta = is_meta(model)
    replay = meta and scratch and replay_is_exact(model.config)
    initial = None  # a full state dict that rank 0 broadcasts after sharding ({} on the other ranks)
    if scratch and not replay:
        if meta:  # a residual variant whose init the replay cannot reproduce: build it whole, as DDP does
            if facts.master:
                print(f"note: residual_mode={model.config.residual_mode!r}: its initial weights cannot be replayed "
                      f"shard by shard (parallel.replay_is_exact); every rank builds the whole model once")
            whole = type(model)(model.config)  # this rank's RNG (seed + rank), as DDP: rank 0's weights are used
            initial = whole.state_dict() if facts.master else {}
            del whole
        elif facts.world_size > 1:
            # each rank drew its own init from seed + rank, as under DDP (so the RNG streams dropout then uses
            # are DDP's too); rank 0's weights are the run's
            initial = {k: v.clone() for k, v in model.state_dict().items()} if facts.master else {}
    mesh = init_device_mesh(facts.device_type, (facts.world_size,))
    ptdtype = facts.ptdtype
    policy = MixedPrecisionPolicy(param_dtype=None if ptdtype == torch.float32 else ptdtype,
                                  reduce_dtype=torch.float32)
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        if facts.use_compile:
            block.compile()  # in place (the parameter names stay), before sharding, as PyTorch recommends
        # the last block's weights would be gathered again at once for the backward pass: keep them
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if meta:
        model.to_empty(device=facts.device)  # this rank's shards only, uninitialised
        model.set_attenuation(1.0)  # the one buffer (non-persistent, so no checkpoint restores it)
        if replay:
            init_scratch_shards(model, seed, facts)
        elif not scratch and facts.init_from not in ("scratch", "resume"):  # a retrofit (training.build_model)
            if not load_pretrained_shards(model, facts.init_from) and facts.master:
                print(f"note: residual_mode={model.config.residual_mode!r}: the random draws of the whole-model "
                      f"build cannot be replayed, so dropout draws other masks than a DDP retrofit's")
    if initial is not None:
        set_model_state_dict(model, initial, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def is_meta(model):
    return any(p.is_meta for p in model.parameters())


def place(model, facts, scratch, seed=None):
    """Before the optimizer exists: fsdp shards the model (FSDP replaces the parameters by their shards; a
    meta-device model is materialised shard by shard, scratch weights from `seed`, rank 0's seed), ddp moves
    it to the device."""
    if facts.fsdp:
        shard(model, facts, scratch, seed)
    else:
        model.to(facts.device)


def load_resumed(model, optimizer, resumed, resume_from, facts):
    """Fill the placed model (fsdp: sharded) and its optimizer from the checkpoint RunFolder.load_resume read,
    whichever parallelism wrote it (the optimizer keeps its own param_groups' layout; train.py restores the
    hyperparameters from the settings after):
      fsdp <- sharded:  DCP reads each rank's shards, resharded for this world size (checkpoint.load_sharded)
      fsdp <- ckpt.pt:  every rank copies its shards out of the memory-mapped full weights and AdamW moments
      ddp  <- sharded:  the moments read whole by load_resume, matched to this optimizer by parameter name
      ddp  <- ckpt.pt:  the optimizer's own state_dict"""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = checkpoint.optimizer_param_names(model, optimizer)
    if facts.fsdp and os.path.isdir(resume_from):
        checkpoint.load_sharded(resume_from, model, optimizer)
    elif facts.fsdp:
        options = StateDictOptions(full_state_dict=True)
        weights = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in resumed["model"].items()}
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, checkpoint.optimizer_state_by_name(resumed["optimizer"], names),
                                 options=options)
    elif "optimizer_by_name" in resumed:
        groups = optimizer.state_dict()["param_groups"]
        optimizer.load_state_dict(checkpoint.optimizer_state_by_id(resumed["optimizer_by_name"], names, groups))
    else:
        optimizer.load_state_dict(resumed["optimizer"])


def wrap(model, facts):
    """After the optimizer exists: ddp compiles (fsdp compiled each block when sharding) and wraps in DDP."""
    if facts.fsdp:
        return model
    if facts.use_compile:
        model = torch.compile(model)
    if facts.distributed:
        model = DDP(model, device_ids=[facts.local_rank] if facts.device_type == "cuda" else None)
    return model


def keep_blocks_gathered(model, keep):
    """fsdp gradient accumulation: keep every block's weights gathered through the forward pass (the loop also
    keeps them after each backward but the last), so a step gathers them once, not twice per micro-step."""
    for block in model.transformer.h[:-1]:  # the last block (and the root) stay gathered after forward anyway
        block.set_reshard_after_forward(not keep)


def set_micro_step(model, facts, last, accumulate_gathered):
    """Before a micro-step's forward: gradients are synchronised across ranks on the last micro-step only."""
    if facts.distributed and not facts.fsdp:  # DDP decides in the forward pass whether this backward all-reduces
        model.require_backward_grad_sync = last
    if accumulate_gathered:  # the last backward reduce-scatters the summed gradients and frees the weights
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)


def reshard_all(model):
    """fsdp: free every gathered weight (FSDP keeps the root's, and the last block's, after a forward pass
    that no backward follows), so what reads parameters next sees the float32 shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local(t):
    """This rank's part of a tensor: its shard if FSDP sharded it (a DTensor), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def sum_over_ranks(tensor, facts):
    if facts.distributed:
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj, facts):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a collective)."""
    if not facts.distributed:
        return [obj]
    out = [None] * facts.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_rng_states(facts):
    """The RNG states of every rank, gathered (a collective: every rank calls it)."""
    return gather_objects(checkpoint.rng_state(facts.device_type, facts.device), facts)


def weights_finite(raw_model, facts):
    finite = all(bool(torch.isfinite(local(p)).all()) for p in raw_model.parameters())
    if not facts.fsdp:
        return finite  # every rank holds the same whole weights
    flag = torch.tensor(float(finite), device=facts.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # each rank checked its shards: all must be finite
    return bool(flag.item())


def local_bytes(tensors):
    """Bytes this rank holds for these tensors (a sharded one: its shard), each storage counted once."""
    seen, total = set(), 0
    for t in tensors:
        t = local(t)
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def held_state_bytes(raw_model, optimizer):
    """What this rank holds between steps: weights, gradients (as the optimizer sees them) and AdamW state.
    DDP's gradient buckets (another copy of the gradients) are not counted."""
    params = list(raw_model.parameters())
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": local_bytes(v for state in optimizer.state.values() for v in state.values()
                                     if torch.is_tensor(v))}


def memory_report(facts, held_bytes):
    """Per rank (a collective): held_state_bytes at the first step, peak resident memory, peak CUDA memory."""
    max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    cuda_mib = torch.cuda.max_memory_allocated(facts.device) / 2**20 if facts.device_type == "cuda" else None
    mine = dict(held_bytes or {}, rank=facts.rank, max_rss_mib=round(max_rss_mib, 1),
                cuda_max_allocated_mib=None if cuda_mib is None else round(cuda_mib, 1))
    return gather_objects(mine, facts)


def finish(facts):
    if facts.distributed:
        dist.barrier()  # no rank tears the group down while another still talks to it (gloo aborts then)
        dist.destroy_process_group()


def abort(facts):
    if facts.distributed:
        dist.destroy_process_group()


def peak_flops_of(facts):
    """The dense bf16 peak FLOP/s of this GPU for MFU (None where unknown, e.g. on a CPU)."""
    if facts.device_type != "cuda":
        return None
    gpu_name = torch.cuda.get_device_name(facts.device)
    for name, flops in (("H200", 989e12), ("H100", 756e12 if "PCIe" in gpu_name else 989e12), ("A100", 312e12)):
        if name in gpu_name:
            return flops
    return None

# -----------------------------------------------------------------------------
# Meta-device init (parallelism='fsdp', scratch): GPT.__init__'s random draws replayed one module at a time,
# so that each rank allocates its shards plus one full module's tensors, never the whole model.
#
# GPT(config) on a CPU writes every parameter in four phases, all from the global torch RNG:
#   1. construction, in module order (named_modules, pre-order): nn.Linear / nn.Embedding draw their default
#      init (kaiming-uniform / normal), norms fill ones / zeros, the residual variant builds its parameters
#   2. self.apply(_init_weights): post-order over the modules, normal(0, 0.02) for every Linear and Embedding
#   3. GPT-2's scaled init of the residual output projections, in named_parameters order
#   4. self.residual.reset_parameters()
# replay_scratch_init runs the same draws in the same order on scratch copies of one module at a time, so
# every value (and the RNG state after) is what GPT(config) gives; the last write of a parameter is its value.
# replay_is_exact checks that claim on a narrow model of the same depth and residual settings before a run
# relies on it (a residual variant with draws of its own in __init__ would fail it: shard then builds whole).

class NotReplayable(Exception):
    """GPT.__init__ holds a write replay_scratch_init does not know how to reproduce."""


def _post_order(module, prefix=""):
    """(name, module) in the order nn.Module.apply visits them: children first, then the module."""
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix.rstrip("."), module


def _builtin(module):
    return type(module).__module__.startswith("torch.nn.")


def _scratch_copy(module):
    """A CPU copy of a meta module's own parameters (not its children's), uninitialised."""
    copy_ = copy.copy(module)  # a shallow copy: its own parameter dict is replaced below, the original is kept
    copy_._parameters = {k: None if p is None else torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                                      p.requires_grad)
                         for k, p in module._parameters.items()}
    copy_._modules = {}
    return copy_


CHUNK_NUMEL = 2**22  # a parameter larger than this (16 MiB of float32) is replayed in chunks of this size


class _RecordInit(TorchDispatchMode):
    """Records the in-place initialisations (normal_, uniform_, zero_, fill_) a module's init code applies to
    the given meta parameters, instead of running them; ok=False if it writes them in any other way (or writes
    a view of them), which a chunked replay could not reproduce."""

    CHUNKABLE = ("normal_", "uniform_", "zero_", "fill_")

    def __init__(self, keys):
        super().__init__()
        self.keys, self.calls, self.ok = keys, [], True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        writes_first = bool(schema.arguments) and schema.arguments[0].alias_info is not None and \
            schema.arguments[0].alias_info.is_write
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if writes_first and target is not None and target.is_meta:
            if id(target) in self.keys and schema.name.split("::")[-1] in self.CHUNKABLE \
                    and kwargs.get("generator") is None:
                self.calls.append((self.keys[id(target)], func, args[1:], kwargs))
                return target
            self.ok = False
        return func(*args, **kwargs)


class _Chunked:
    """A full tensor's value as one recorded init op, generated CHUNK_NUMEL elements at a time: the same
    numbers and RNG consumption as the op on the whole tensor (chunks start at multiples of 16, and a tail of
    under 16 elements joins the chunk before it: CPU normal_ draws in blocks of 16 and redoes its last 16;
    _chunks_are_exact checks this on every start)."""

    def __init__(self, numel, dtype, func, args, kwargs, chunk=None):
        self.numel, self.dtype, self.func, self.args, self.kwargs = numel, dtype, func, args, kwargs
        self.chunk = chunk or CHUNK_NUMEL

    def pieces(self):
        """(flat offset, values) in order; the values' buffer is reused: copy what you keep."""
        buffer = torch.empty(min(self.numel, self.chunk + 16), dtype=self.dtype)
        start = 0
        while start < self.numel:
            size = min(self.chunk, self.numel - start)
            if 0 < self.numel - start - size < 16:
                size = self.numel - start
            piece = buffer[:size]
            self.func(piece, *self.args, **self.kwargs)
            yield start, piece
            start += size


@functools.cache
def _chunks_are_exact():
    """Whether _Chunked reproduces whole-tensor normal_ and uniform_ on this build of torch (values and RNG)."""
    with torch.random.fork_rng(devices=[]):
        for func, args in ((torch.ops.aten.normal_.default, (0.0, 0.02)),
                           (torch.ops.aten.uniform_.default, (-0.1, 0.1))):
            for numel in (64 * 12, 64 * 12 + 5, 64 * 12 + 37):
                torch.manual_seed(0)
                whole = func(torch.empty(numel), *args)
                after = torch.get_rng_state()
                torch.manual_seed(0)
                chunked = torch.empty(numel)
                for start, piece in _Chunked(numel, torch.float32, func, args, {}, chunk=64).pieces():
                    chunked[start:start + piece.numel()] = piece
                if not (torch.equal(whole, chunked) and torch.equal(after, torch.get_rng_state())):
                    return False
    return True


def _recorded_init(module, init):
    """{parameter key: [recorded calls]} of init(copy of module) on meta tensors, or None if it cannot be
    replayed in chunks (_RecordInit.ok) or chunking is not exact here."""
    if not _chunks_are_exact():
        return None
    meta = copy.copy(module)
    meta._parameters = {k: None if p is None else torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype,
                                                                                 device="meta"), p.requires_grad)
                        for k, p in module._parameters.items()}
    meta._modules = {}
    recorder = _RecordInit({id(p): k for k, p in meta._parameters.items() if p is not None})
    with recorder:
        init(meta)
    if not recorder.ok:
        return None
    return [(key, _Chunked(meta._parameters[key].numel(), meta._parameters[key].dtype, func, args, kwargs))
            for key, func, args, kwargs in recorder.calls]


def replay_scratch_init(config, write=None):
    """GPT(config)'s initial weights with its random draws, from the current torch RNG state, without ever
    holding the whole model: write(name, full_tensor) is called for every parameter and buffer, possibly more
    than once (the last call holds its value; tied parameters get both names); a tensor over CHUNK_NUMEL
    elements arrives as write(name, piece, flat_offset, numel), piece by piece in order (a reused buffer: copy
    what you keep). write=None only advances the RNG as GPT(config) would. NotReplayable if the model holds a
    module this cannot reproduce."""
    with torch.device("meta"):
        twin = GPT(config)  # the module tree and shapes, no memory
    own = config.residual_mode  # the residual variant's prefix: it is small, so it is built whole on the CPU
    with torch.random.fork_rng(devices=[]):  # its construction draws are replayed below, in the model's order
        residual = RESIDUALS[own](config)
    in_residual = lambda name: name == own or name.startswith(own + ".")
    sub = lambda name: residual if name == own else residual.get_submodule(name[len(own) + 1:])
    aliases = {}  # a tied parameter's names (the embedding and lm_head): a write to one is a write to all
    for name, p in twin.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    aliases = {name: names for names in aliases.values() for name in names}

    def emit(name, value):
        """A full tensor, or a _Chunked one (its draws run here, once, whatever write does with them)."""
        names = aliases.get(name, [name])
        if isinstance(value, _Chunked):
            for start, piece in value.pieces():
                for alias in names if write is not None else ():
                    write(alias, piece, start, value.numel)
        elif write is not None:
            for alias in names:
                write(alias, value)

    def init_in_chunks(name, module, init):
        """A large module's init (its reset_parameters, or _init_weights) replayed chunk by chunk; False if
        it is small or its init cannot be chunked (then the caller runs it on a full scratch copy)."""
        if max((p.numel() for p in module.parameters(recurse=False)), default=0) <= CHUNK_NUMEL:
            return False
        recorded = _recorded_init(module, init)
        if recorded is None:
            return False
        for key, value in recorded:
            emit(f"{name}.{key}", value)
        return True

    def emit_params(name, module):
        for key, p in module.named_parameters(recurse=False):
            emit(f"{name}.{key}" if name else key, p.detach())

    for name, _ in twin.named_buffers():
        if name != "attenuation" and not in_residual(name):  # GPT's own buffer is set by shard()
            raise NotReplayable(f"buffer {name}")
    with torch.no_grad():
        # 1. construction
        for name, module in twin.named_modules():
            if in_residual(name):
                if _builtin(sub(name)) and hasattr(sub(name), "reset_parameters"):
                    sub(name).reset_parameters()  # the draws it made when the variant built it
            elif next(module.parameters(recurse=False), None) is None:
                continue
            elif _builtin(module) and hasattr(module, "reset_parameters"):
                if init_in_chunks(name, module, lambda m: m.reset_parameters()):
                    continue
                scratch = _scratch_copy(module)
                scratch.reset_parameters()
                emit_params(name, scratch)
                del scratch
            elif isinstance(module, RMSNorm):  # RMSNorm.__init__: weight = ones
                emit(f"{name}.weight", torch.ones(module.weight.shape, dtype=module.weight.dtype))
            else:
                raise NotReplayable(f"module {name} ({type(module).__name__})")
        # 2. self.apply(self._init_weights)
        for name, module in _post_order(twin):
            if in_residual(name):
                twin._init_weights(sub(name))
            elif next(module.parameters(recurse=False), None) is not None:
                if init_in_chunks(name, module, twin._init_weights):
                    continue
                scratch = _scratch_copy(module)
                for p in scratch.parameters():
                    p.fill_(float("nan"))  # what _init_weights leaves unwritten stays nan: not emitted
                twin._init_weights(scratch)
                for key, p in scratch.named_parameters():
                    if p.numel() and not math.isnan(p.view(-1)[0]):  # an init writes the whole tensor
                        emit(f"{name}.{key}", p)
                del scratch  # before the next module's: one module's full tensors at a time
        # 3. the scaled init of the residual output projections
        for name, p in twin.named_parameters():
            if name.endswith(SCALED_INIT_SUFFIXES):
                std = scaled_init_std(config)
                if in_residual(name):
                    torch.nn.init.normal_(sub(own).get_parameter(name[len(own) + 1:]), mean=0.0, std=std)
                elif p.numel() > CHUNK_NUMEL and _chunks_are_exact():
                    emit(name, _Chunked(p.numel(), p.dtype, torch.ops.aten.normal_.default, (0.0, std), {}))
                else:
                    emit(name, torch.nn.init.normal_(torch.empty(p.shape, dtype=p.dtype), mean=0.0, std=std))
        # 4. the residual variant's own init, then its values
        residual.reset_parameters()
        for key, t in list(residual.named_parameters()) + list(residual.named_buffers()):
            emit(f"{own}.{key}", t.detach())


def replay_is_exact(config):
    """Whether replay_scratch_init reproduces GPT(config) exactly: checked on a narrow model of the same
    depth, arch and residual settings (weights and the RNG state after), with the global RNG left as it was."""
    narrow = dataclasses.replace(config, n_embd=4 * config.n_head, vocab_size=32, block_size=8,
                                 intermediate_size=None if config.intermediate_size is None else 16)
    with torch.random.fork_rng(devices=[]):
        try:
            torch.manual_seed(0)
            expected = GPT(narrow).state_dict(keep_vars=False)
            expected_rng = torch.get_rng_state()
            replayed = {}

            def keep(name, value, start=None, numel=None):
                if start is None:
                    replayed[name] = value.clone()
                else:
                    if start == 0:
                        replayed[name] = torch.empty(numel, dtype=value.dtype)
                    replayed[name][start:start + value.numel()] = value

            torch.manual_seed(0)
            replay_scratch_init(narrow, keep)
            replayed = {k: v.view(expected[k].shape) if k in expected else v for k, v in replayed.items()}
            expected = {k: v for k, v in expected.items() if k != "attenuation"}
            return (torch.equal(torch.get_rng_state(), expected_rng) and replayed.keys() >= expected.keys()
                    and all(torch.equal(replayed[k], v) for k, v in expected.items()))
        except (NotReplayable, ValueError):
            return False


def shard_of(full, param):
    """This rank's part of a full tensor, as `param` (a DTensor sharded on one dim, or a plain tensor) holds it."""
    if not hasattr(param, "placements"):
        return full
    piece = full
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            size, rank = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
            chunks = torch.chunk(piece, size, dim=placement.dim)  # FSDP2's layout: torch.chunk, then empty ones
            piece = chunks[rank] if rank < len(chunks) else piece.narrow(placement.dim, 0, 0)
    return piece


def shard_range(param):
    """[lo, hi): the flat element range of the full tensor that this rank's shard of `param` holds (sharded on
    dim 0 or not at all)."""
    if not hasattr(param, "placements"):
        return 0, param.numel()
    placements = [p for p in param.placements if p.is_shard()]
    if not placements:
        return 0, param.numel()
    if len(placements) > 1 or placements[0].dim != 0:
        raise NotReplayable(f"a parameter sharded as {param.placements}")
    rows_per_rank = -(-param.shape[0] // param.device_mesh.size())  # torch.chunk's sizes
    row = param.numel() // max(param.shape[0], 1)
    first = min(param.device_mesh.get_local_rank() * rows_per_rank, param.shape[0])
    last = min(first + rows_per_rank, param.shape[0])
    return first * row, last * row


def init_scratch_shards(model, seed, facts):
    """Fill a sharded, materialised (to_empty) model with GPT(config)'s init from torch.manual_seed(seed):
    every rank replays the draws and keeps its shards, so the weights equal DDP's (rank 0's init, broadcast).
    Then each rank's RNG is left as if it had built the model itself from its current state (seed + rank, as
    train.py seeds it), as it is under DDP: dropout draws the same streams."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers())
    written = set()

    def write(name, value, start=None, numel=None):
        """A full tensor, or the flat piece at `start` of one of `numel` elements: this rank keeps its part."""
        target = local(targets[name])
        if start is None:
            target.copy_(shard_of(value, targets[name]).to(target.device))
        else:  # a dim-0 shard is one flat range of the full tensor: copy where the piece overlaps it
            lo, hi = shard_range(targets[name])
            a, b = max(lo, start), min(hi, start + value.numel())
            if a < b:
                target.view(-1)[a - lo:b - lo].copy_(value[a - start:b - start].to(target.device))
        written.add(name)

    with torch.no_grad():
        own_state = torch.get_rng_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = torch.get_rng_state()
            replay_scratch_init(model.config, write)
            after = torch.get_rng_state()
        if torch.equal(own_state, fresh):  # rank 0 (whose RNG is seed's, untouched): the same draws
            torch.set_rng_state(after)
        else:
            replay_scratch_init(model.config)  # advance this rank's RNG as its own GPT(config) would
    missing = {name for name, p in model.named_parameters()} - written
    if missing:
        raise NotReplayable(f"parameters the replay never wrote: {sorted(missing)[:3]}")

# -----------------------------------------------------------------------------
# Retrofits (parallelism='fsdp', init_from=<HF directory>): what from_pretrained builds whole, loaded shard by shard


def residual_initial_state(config):
    """{name: value} of the residual variant's parameters and buffers as GPT(config), and so from_pretrained,
    initialises them (the weights a pretrained model lacks): the variant built alone on the CPU (it is small),
    then GPT.__init__'s init steps that reach it (_init_weights over its modules, the scaled init, its
    reset_parameters). NotReplayable if the values depend on the RNG: GPT(config) draws them after the whole
    model's draws, which this does not make."""
    def build(seed):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            residual = RESIDUALS[config.residual_mode](config)
            residual.apply(functools.partial(GPT._init_weights, None))  # it reads only the module it is given
            for name, p in residual.named_parameters():
                if f"{config.residual_mode}.{name}".endswith(SCALED_INIT_SUFFIXES):
                    torch.nn.init.normal_(p, mean=0.0, std=scaled_init_std(config))
            residual.reset_parameters()
            return {f"{config.residual_mode}.{k}": v.detach()
                    for k, v in [*residual.named_parameters(), *residual.named_buffers()]}

    first, second = build(0), build(1)
    if any(not torch.equal(v, second[k]) for k, v in first.items()):
        raise NotReplayable(f"residual_mode={config.residual_mode!r} starts from random values of its own")
    return first


def retrofit_builds_whole(name_or_dir, config):
    """Why an fsdp retrofit from these weights must build the whole model on every rank before sharding (a
    sentence), or None when it loads shard by shard (load_pretrained_shards): safetensors files in a local
    directory, and a residual variant whose initial values do not depend on the RNG."""
    if hf.safetensors_files(name_or_dir) is None:
        return "no .safetensors weights in a local directory (a hub name, or .bin files) to read tensor by tensor"
    try:
        residual_initial_state(config)
    except NotReplayable as e:
        return str(e)
    return None


def load_pretrained_shards(model, name_or_dir):
    """Fill a sharded, materialised (to_empty) retrofit with from_pretrained(name_or_dir)'s weights: each
    pretrained tensor read alone (hf.pretrained_tensors) and each rank keeping its shard of it, the residual
    variant's from residual_initial_state. Then each rank's RNG advances as the GPT(config) that from_pretrained
    builds would advance it, so dropout draws the same streams; False where replay_scratch_init cannot reproduce
    GPT(config)'s draws (deepnorm's): the RNG is then left as it was (the weights are exact all the same)."""
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    with torch.no_grad():
        # a generator: one full pretrained tensor is held at a time
        for name, full in itertools.chain(hf.pretrained_tensors(name_or_dir, model),
                                          residual_initial_state(model.config).items()):
            target = local(targets[name])
            target.copy_(shard_of(full, targets[name]).to(target.device))
            del full  # before the next one is read
    if not replay_is_exact(model.config):
        return False
    replay_scratch_init(model.config)
    return True
