"""tokenmill.optim.AdamW8bit with FSDP2-sharded (DTensor) parameters: 2 gloo processes against one process
(bit-exact where the shards hold whole quantisation blocks), sharded state through full and DCP
checkpoints, refusal of another world size, absmax layouts on hybrid meshes and Shard(1) without
communication (a fake process group). The CUDA kernel on local shards: test_kernels_emulated.py
(test_adamw8bit_dtensor_shards_one_launch) and, with a GPU, the last test here."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from tokenmill.optim import AdamW8bit
from tokenmill.optim import adamw8bit as A

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Sharded (DTensor) parameters on 2 gloo processes. Row counts: "aligned" shards are 32 x 96 = 12 whole
# blocks each; "ragged" shards are 23 and 22 rows of 130 (2990 and 2860 elements: blocks straddle rows
# that a single process would group differently); "row" and "scalar" leave rank 1 an empty shard; "bias"
# and "scalar" are below min_8bit_size (fp32 moments). "extra" stays a plain tensor in the same group.

SHARDED = {"aligned": (64, 96), "ragged": (45, 130), "row": (1, 5000), "bias": (3,), "scalar": (1,)}
FSDP_KW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


class _Params(torch.nn.Module):
    def __init__(self, shapes, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(*shape, generator=g)))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sharded = _Params(SHARDED, seed=0)
        self.plain = _Params({"extra": (300, 20)}, seed=1)


def _fsdp_grads(step):
    """The full gradients of optimizer step ``step``, the same on every process."""
    g = torch.Generator().manual_seed(1000 + step)
    shapes = {f"sharded.{k}": s for k, s in SHARDED.items()} | {"plain.extra": (300, 20)}
    return {k: torch.randn(*s, generator=g) * (1 + step % 3) for k, s in shapes.items()}


def _fsdp_steps(net, opt, first, last):
    from torch.distributed.tensor import DTensor, distribute_tensor

    for step in range(first, last + 1):
        grads = _fsdp_grads(step)
        for name, p in net.named_parameters():
            full = grads[name].to(p.dtype)
            p.grad = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full
        opt.step()
        opt.zero_grad(set_to_none=True)


def _sharded_net(mesh):
    from torch.distributed.fsdp import fully_shard

    net = _Net()
    fully_shard(net.sharded, mesh=mesh)  # net.plain keeps plain tensors
    return net, AdamW8bit(net.parameters(), **FSDP_KW)


def _locals(net, opt):
    """Every parameter's and state tensor's local data (this rank's shard), to compare runs bit for bit."""
    out = {}
    for name, p in net.named_parameters():
        out[name] = A._local(p.detach()).clone()
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                out[f"{name}/{k}"] = A._local(v).clone()
    return out


def _fsdp_optim_worker(rank, world, port, tmp):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    tmp = Path(tmp)
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    try:
        mesh = init_device_mesh("cpu", (world,))
        net, opt = _sharded_net(mesh)
        _fsdp_steps(net, opt, 1, 3)
        # the trainer's checkpoint (full state dicts gathered to rank 0) and a sharded DCP checkpoint
        msd, osd = get_state_dict(net, opt, options=full_opts)
        if rank == 0:
            torch.save({"model": msd, "optim": osd}, tmp / "full.pt")
        dcp.save(
            {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)},
            checkpoint_id=tmp / "dcp",
        )
        dist.barrier()
        p = net.sharded.aligned
        st = opt.state[p]
        out = {
            "aligned_numel": p.to_local().numel(),
            "aligned_bytes": sum(A._local(st[k]).nbytes for k in ("state1", "state2", "absmax1", "absmax2")),
            "sharded_bytes": opt.state_bytes()
            - sum(v.nbytes for v in opt.state[net.plain.extra].values() if isinstance(v, torch.Tensor)),
        }
        _fsdp_steps(net, opt, 4, 6)
        ref = _locals(net, opt)
        out["params"] = {
            n: q.detach().full_tensor() if hasattr(q, "full_tensor") else q.detach()
            for n, q in net.named_parameters()
        }

        # resume from the full checkpoint, as the trainer does, and from the DCP one: bit-exact
        resumed = {}
        for kind in ("full", "dcp"):
            net2, opt2 = _sharded_net(mesh)
            if kind == "full":
                saved = torch.load(tmp / "full.pt", weights_only=True)
                set_state_dict(
                    net2,
                    opt2,
                    model_state_dict=saved["model"],
                    optim_state_dict=saved["optim"],
                    options=StateDictOptions(full_state_dict=True),
                )
            else:
                sd = {"model": get_model_state_dict(net2), "optim": get_optimizer_state_dict(net2, opt2)}
                dcp.load(sd, checkpoint_id=tmp / "dcp")
                set_state_dict(net2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            assert opt2.state[net2.sharded.aligned]["step"] == 3
            _fsdp_steps(net2, opt2, 4, 6)
            got = _locals(net2, opt2)
            resumed[kind] = sorted(k for k in ref if not torch.equal(ref[k], got[k]))
        out["resumed_mismatches"] = resumed

        # 8-bit state laid out for another world size (4 shards of "ragged") is refused
        bad = torch.load(tmp / "full.pt", weights_only=True)["optim"]
        bad["state"]["sharded.ragged"]["absmax1"] = torch.zeros(4, -(-12 * 130 // 256))
        net3, opt3 = _sharded_net(mesh)
        try:
            set_optimizer_state_dict(net3, opt3, bad, options=StateDictOptions(full_state_dict=True))
            out["refused"] = None
        except ValueError as e:
            out["refused"] = str(e)
        # ... and so is a DCP checkpoint of 2 shards loaded into 1 shard per process (absmax [2, b] vs [1, b'])
        net4, opt4 = _sharded_net(
            init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "shard"))["shard"]
        )
        sd = {"model": get_model_state_dict(net4), "optim": get_optimizer_state_dict(net4, opt4)}
        try:
            dcp.load(sd, checkpoint_id=tmp / "dcp")
            out["dcp_refused"] = None
        except CheckpointException as e:  # raised on every rank, with each rank's error
            out["dcp_refused"] = str(e)
        dist.barrier()  # both ranks done with every collective before either tears its group down
        torch.save(out, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process(split_ragged=False):
    """The same run in one process without FSDP; ``split_ragged`` steps the two row blocks of "ragged"
    that the 2 shards hold as two separate tensors."""
    net = _Net()
    params = dict(net.named_parameters())
    if split_ragged:
        r = params.pop("sharded.ragged").detach()
        params["top"], params["bottom"] = (
            torch.nn.Parameter(r[:23].clone()),
            torch.nn.Parameter(r[23:].clone()),
        )
    halves = [p for n, p in params.items() if n in ("top", "bottom")]  # 8-bit, as the shards of "ragged"
    rest = [p for n, p in params.items() if n not in ("top", "bottom")]
    opt = AdamW8bit([{"params": rest}, {"params": halves, "min_8bit_size": 0}], **FSDP_KW)
    states = {}
    for step in range(1, 7):
        grads = _fsdp_grads(step)
        if split_ragged:
            r = grads.pop("sharded.ragged")
            grads["top"], grads["bottom"] = r[:23], r[23:]
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()
        if step == 3:
            states = {
                n: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
                for n, p in params.items()
            }
    if split_ragged:
        params["sharded.ragged"] = torch.cat([params.pop("top"), params.pop("bottom")])
    return {n: p.detach() for n, p in params.items()}, states, opt, net


@pytest.mark.slow
def test_fsdp2_sharded_params_two_gloo_processes(tmp_path):
    """FSDP2 + AdamW8bit on 2 processes against 1 process on the same parameters and gradients.

    Exact (bit for bit) where each shard holds whole 256-element blocks ("aligned"), where a shard is the
    whole tensor or empty ("row", "scalar"), for fp32 moments and for the unsharded parameter. "ragged":
    exactly the single-process update of its two shards stepped as two tensors (the blocks follow the
    shards); against the unsplit single-process run, the update differs by 0.75% (relative L2 over 6 steps,
    bound 2%), less than either differs from torch.optim.AdamW (about 1%, bound 2%)."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _fsdp_optim_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    two = out[0]["params"]
    single, single_states, single_opt, single_net = _single_process()
    split, _, _, _ = _single_process(split_ragged=True)
    for name in ("sharded.aligned", "sharded.row", "sharded.bias", "sharded.scalar", "plain.extra"):
        assert torch.equal(two[name], single[name]), name
    assert torch.equal(two["sharded.ragged"], split["sharded.ragged"])
    init = _Net()
    ref = torch.optim.AdamW(init.parameters(), **FSDP_KW)
    for step in range(1, 7):
        for name, p in init.named_parameters():
            p.grad = _fsdp_grads(step)[name]
        ref.step()
    start = dict(_Net().named_parameters())["sharded.ragged"].detach()
    exact = dict(init.named_parameters())["sharded.ragged"].detach()

    def rel(a, b):
        return ((a - b).norm() / (b - start).norm()).item()

    assert 0 < rel(two["sharded.ragged"], single["sharded.ragged"]) < 0.02
    assert rel(two["sharded.ragged"], exact) < 0.02 and rel(single["sharded.ragged"], exact) < 0.02

    # (c) about 2 bytes of state per element of each rank's shard: 2 + 2 x 4 / 256
    for o in out:
        per = o["aligned_bytes"] / o["aligned_numel"]
        assert o["aligned_numel"] == 32 * 96 and 2.0 < per <= 2.04, per
    # summed over ranks, the sharded parameters' state is the single process's plus the absmax padding:
    # "ragged" has 12 + 12 blocks on the shards (23 unsplit), "row" an empty shard with a row of 20 blocks
    extra_state = single_opt.state[single_net.plain.extra].values()
    single_sharded = single_opt.state_bytes() - sum(
        v.nbytes for v in extra_state if isinstance(v, torch.Tensor)
    )
    assert sum(o["sharded_bytes"] for o in out) == single_sharded + 2 * 4 * (1 + 20)

    # checkpoints: resuming from the full and from the DCP checkpoint continues bit for bit
    for o in out:
        assert o["resumed_mismatches"] == {"full": [], "dcp": []}
        assert "resumes only on the sharding (world size) that saved it" in o["refused"]
        assert (
            "Size mismatch between saved torch.Size([2, 12]) and current: torch.Size([1, 24])"
            in o["dcp_refused"]
        )
    # the full checkpoint of aligned shards holds the single-process codes and scales, rows = shards
    saved = torch.load(tmp_path / "full.pt", weights_only=True)["optim"]["state"]["sharded.aligned"]
    assert saved["state1"].shape == (64, 96) and saved["absmax1"].shape == (2, 12)
    assert torch.equal(saved["state1"].view(-1), single_states["sharded.aligned"]["state1"])
    assert torch.equal(saved["absmax2"].view(-1), single_states["sharded.aligned"]["absmax2"])

    # ... and does not load into one process (world size 2 -> 1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    net = _Net()
    opt = AdamW8bit(net.parameters(), **FSDP_KW)
    full = torch.load(tmp_path / "full.pt", weights_only=True)["optim"]
    with pytest.raises(
        ValueError,
        match=r"'state1' of parameter 0 .* is shape \(64, 96\) unsharded, expected shape \(6144,\)",
    ):
        set_optimizer_state_dict(net, opt, full, options=StateDictOptions(full_state_dict=True))


def test_sharded_layouts_without_communication():
    """Rank 3 of a fake 4-process group (no communication): a hybrid (Replicate, Shard(0)) mesh and a
    Shard(1) parameter get absmax rows as long as the largest shard's block count; each shard steps exactly
    as reference_step on its local data; placements other than Shard / Replicate, and a gradient sharded
    otherwise than its parameter, are refused."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=4)
    try:
        hsdp, flat = init_device_mesh("cpu", (2, 2)), init_device_mesh("cpu", (4,))
        g = torch.Generator().manual_seed(0)
        cases = [  # mesh, placements, global shape, this rank's slice, absmax global shape
            (hsdp, (Replicate(), Shard(0)), (10, 300), (slice(5, 10),), (2, 6)),  # 1500 elements, 6 blocks
            (flat, (Shard(1),), (300, 10), (slice(None), slice(9, 10)), (4, 4)),  # chunks of 3 cols: 900 -> 4
        ]
        for mesh, placements, shape, where, absmax_shape in cases:
            full = torch.randn(*shape, generator=g)

            def shard(t, mesh=mesh, placements=placements, where=where):
                local = t[where].contiguous()
                return DTensor.from_local(
                    local, mesh, placements, run_check=False, shape=t.shape, stride=t.stride()
                )

            p = torch.nn.Parameter(shard(full))
            opt = AdamW8bit([p], min_8bit_size=0)
            ref, ref_state = full[where].clone(), {}
            opt._init_state(ref, ref_state, 0)
            for step in range(1, 3):
                grad = torch.randn(*shape, generator=g)
                p.grad = shard(grad)
                opt.step()
                ref_state["step"] = step
                A.reference_step(ref, grad[where].contiguous(), ref_state, 1e-3, 0.9, 0.999, 1e-8, 1e-2)
                assert torch.equal(p.to_local(), ref)
            absmax = opt.state[p]["absmax2"]
            assert absmax.shape == absmax_shape and absmax.placements == (*placements[:-1], Shard(0))
            n_blocks = -(-ref.numel() // 256)
            assert torch.equal(absmax.to_local()[0, :n_blocks], ref_state["absmax2"])
            assert opt.state_bytes() == 2 * ref.numel() + 2 * 4 * absmax_shape[1]
        p = torch.nn.Parameter(DTensor.from_local(torch.randn(8), flat, [Partial()], run_check=False))
        p.grad = DTensor.from_local(torch.randn(8), flat, [Partial()], run_check=False)
        with pytest.raises(ValueError, match="must be sharded"):
            AdamW8bit([p], min_8bit_size=0).step()
        # a gradient sharded otherwise than its parameter
        p = torch.nn.Parameter(DTensor.from_local(torch.randn(8), flat, [Shard(0)], run_check=False))
        p.grad = DTensor.from_local(torch.randn(32), flat, [Replicate()], run_check=False)
        with pytest.raises(
            ValueError,
            match=r"param 0: .* both DTensors sharded the same way; got \(Shard\(dim=0\),\) and \(Replicate\(\),\)",
        ):
            AdamW8bit([p]).step()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fully_shard_one_process_equals_plain(tmp_path):
    """On a GPU: FSDP2 in one process (NCCL, world 1) hands the CUDA kernel DTensor parameters and
    gradients; stepped as local tensors, they end bit-identical to the same model without FSDP."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(512, 1000), torch.nn.Linear(1000, 3)).cuda()
        sharded = copy.deepcopy(plain)
        fully_shard(sharded, mesh=init_device_mesh("cuda", (1,)))
        opts = [AdamW8bit(m.parameters(), lr=1e-3, min_8bit_size=0) for m in (plain, sharded)]
        for _ in range(3):
            x = torch.randn(16, 512, device="cuda")
            for m, o in zip((plain, sharded), opts):
                m(x).square().mean().backward()
                o.step()
                o.zero_grad(set_to_none=True)
        for a, b in zip(plain.parameters(), sharded.parameters()):
            assert torch.equal(a, b.full_tensor())
            sa, sb = opts[0].state[a], opts[1].state[b]
            assert torch.equal(sa["state2"].view(a.shape), sb["state2"].full_tensor())
    finally:
        dist.destroy_process_group()
