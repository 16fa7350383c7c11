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
reduction run in another order (so losses agree to float precision, not bit for bit). A checkpoint resumes
with the parallelism that wrote it.
"""

import resource

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanoshift import checkpoint


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


def shard(model, facts, scratch):
    """FSDP2: each block its own unit (gathered just before it runs, freed after), then the root (embeddings,
    final norm, lm_head and the gate: the gate is read before the first block and every block's backward adds
    to its gradient, so it is gathered with the embeddings once per step and reduce-scattered after the last
    block's backward). Weights are gathered in the compute dtype and gradients reduced in float32, while the
    sharded master weights and AdamW state stay float32. Moves the local shards to the device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # a scratch model's weights are rank 0's (each rank drew its own init from seed + rank, as under DDP, so
    # the RNG streams that dropout then uses are DDP's too); pretrained or resumed weights are the same everywhere
    rank0_init = scratch and facts.world_size > 1
    initial = {k: v.clone() for k, v in model.state_dict().items()} if rank0_init and facts.master else {}
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
    if rank0_init:
        set_model_state_dict(model, initial, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def place(model, facts, scratch):
    """Before the optimizer exists: fsdp shards the model (FSDP replaces the parameters by their shards),
    ddp moves it to the device."""
    if facts.fsdp:
        shard(model, facts, scratch)
    else:
        model.to(facts.device)


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
