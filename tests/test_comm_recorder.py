"""CommRecorder on a real 4-process gloo job with a fake 2-node layout (ranks 0,1 on node 0,
ranks 2,3 on node 1). One launch runs every check; each rank writes JSON, pytest asserts the
exact byte counts from the definitions in foe_train.bench.comm.

Run directly as a worker: python tests/test_comm_recorder.py RANK WORLD PORT OUTDIR
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from foe_train.bench.comm import PATCHED_OPS, CommRecorder, gather_summaries

WORLD = 4
NODES = [0, 0, 1, 1]
KINDS = {
    (0, 1): "cluster_ep", (2, 3): "cluster_ep", (0, 2): "federation", (1, 3): "federation",
    (0, 1, 2, 3): "token_dp", (0, 1, 2): "ep",
}
# all_to_all_single over the world: rows rank r sends to rank j (uneven), row = 3 float32
A2A_SPLITS = [[(r + 2 * j) % 3 + 1 for j in range(WORLD)] for r in range(WORLD)]
A2A_WIDTH = 3
# megatron mappings.all_to_all over the cluster group, by group rank; row = 4 float32
MC_SPLITS = [[1, 3], [2, 2]]
MC_WIDTH = 4


# ---------------------------------------------------------------------------------------------
# worker (runs in each of the 4 processes)
# ---------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.manual_seed(1234)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    from foe_train.compat import apply_cpu_compat

    apply_cpu_compat()  # mappings._AllToAll allocates on torch.cuda.current_device()
    from megatron.core.tensor_parallel import mappings

    g01, g23 = dist.new_group([0, 1]), dist.new_group([2, 3])
    g02, g13 = dist.new_group([0, 2]), dist.new_group([1, 3])
    g012 = dist.new_group([0, 1, 2])
    singles = [dist.new_group([r]) for r in range(world)]
    cluster = g01 if rank < 2 else g23
    fed = g02 if rank % 2 == 0 else g13
    fed_peer = (rank + 2) % world
    cl_rank, cl_peer = rank % 2, rank ^ 1

    originals = {op: getattr(dist, op) for op in PATCHED_OPS}
    mc_gather_orig = mappings.dist_all_gather_func
    checks: dict[str, dict] = {}

    def run(name, fn):
        with CommRecorder(group_kinds=KINDS, node_of_rank=NODES) as rec:
            ok = fn()
        checks[name] = {"ok": bool(ok), "records": [r.to_dict() for r in rec.records]}

    def ar_intra():
        t = torch.full((6,), float(rank + 1))
        ret = dist.all_reduce(t, group=cluster)
        return ret is None and torch.equal(t, torch.full((6,), float(rank + cl_peer + 2)))

    def ar_fed():
        t = torch.arange(5, dtype=torch.float64) * (rank + 1)
        work = dist.all_reduce(t, group=fed, async_op=True)
        work.wait()
        expect = torch.arange(5, dtype=torch.float64) * (rank + fed_peer + 2)
        return torch.equal(t, expect)

    def a2a_single():
        chunks = [
            torch.full((A2A_SPLITS[rank][j], A2A_WIDTH), 0.0)
            + (rank * 100 + j * 10 + torch.arange(A2A_SPLITS[rank][j]).unsqueeze(1))
            for j in range(world)
        ]
        inp = torch.cat(chunks)
        out_sizes = [A2A_SPLITS[j][rank] for j in range(world)]
        out = torch.empty(sum(out_sizes), A2A_WIDTH)
        in_sizes = A2A_SPLITS[rank] if rank % 2 else np.array(A2A_SPLITS[rank])
        dist.all_to_all_single(out, inp, output_split_sizes=out_sizes,
                               input_split_sizes=in_sizes)
        expect = torch.cat([
            torch.full((out_sizes[j], A2A_WIDTH), 0.0)
            + (j * 100 + rank * 10 + torch.arange(out_sizes[j]).unsqueeze(1))
            for j in range(world)
        ])
        return torch.equal(out, expect)

    def a2a_equal_list():
        # equal-split all_to_all_single and list all_to_all on the federation group
        me, lo, hi = rank // 2, rank % 2, rank % 2 + 2
        inp = torch.arange(4, dtype=torch.int32) + 10 * rank
        out = torch.empty(4, dtype=torch.int32)
        dist.all_to_all_single(out, inp, group=fed)
        mine = torch.arange(4, dtype=torch.int32)[2 * me:2 * me + 2]
        ok = torch.equal(out, torch.cat([mine + 10 * lo, mine + 10 * hi]))
        ins = [torch.full((3,), 10 * rank + j, dtype=torch.int32) for j in range(2)]
        outs = [torch.empty(3, dtype=torch.int32) for _ in range(2)]  # gloo: equal sizes
        dist.all_to_all(outs, ins, group=fed)
        return ok and all(
            torch.equal(outs[j], torch.full((3,), 10 * (lo, hi)[j] + me, dtype=torch.int32))
            for j in range(2)
        )

    def gathers():
        inp = torch.tensor([[rank, rank + 1], [rank + 2, rank + 3]], dtype=torch.int64)
        out = torch.empty(world * 2, 2, dtype=torch.int64)
        dist.all_gather_into_tensor(out, inp)
        ok = torch.equal(out, torch.cat([inp - rank + r for r in range(world)]))
        lst = [torch.empty(3, dtype=torch.float16) for _ in range(2)]
        dist.all_gather(lst, torch.full((3,), float(rank), dtype=torch.float16), group=fed)
        lo, hi = sorted((rank, fed_peer))
        ok = ok and torch.equal(torch.stack(lst), torch.tensor([[lo] * 3, [hi] * 3],
                                                               dtype=torch.float16))
        return ok

    def reduce_scatters():
        inp = torch.arange(4, dtype=torch.float32) * (rank + 1)
        out = torch.empty(2)
        dist.reduce_scatter_tensor(out, inp, group=fed)
        me = rank // 2
        ok = torch.equal(out, torch.arange(4.0)[2 * me:2 * me + 2] * (rank + fed_peer + 2))
        out2 = torch.empty(5, dtype=torch.float64)
        ins = [torch.full((5,), float(rank * 10 + j), dtype=torch.float64) for j in range(2)]
        dist.reduce_scatter(out2, ins, group=cluster)
        ok = ok and torch.equal(out2, torch.full((5,), float(20 * (rank // 2 * 2) + 10
                                                             + 2 * cl_rank),
                                                 dtype=torch.float64))
        return ok

    def chain():
        a = torch.full((3,), float(rank))
        ret = dist.all_reduce(a, group=g012)  # rank 3 is not a member: a no-op
        ok = ret is None and torch.equal(a, torch.full((3,), 3.0))
        if rank < 3:  # torch's broadcast raises on non-members (src lookup), so skip rank 3
            t = torch.full((4,), float(rank + 5))
            dist.broadcast(t, src=1, group=g012)
            ok = ok and torch.equal(t, torch.full((4,), 6.0))
        r = torch.full((3,), float(rank + 1), dtype=torch.float64)
        dist.reduce(r, dst=0, group=dist.group.WORLD)
        if rank == 0:
            ok = ok and torch.equal(r, torch.full((3,), 10.0, dtype=torch.float64))
        return ok

    def singleton():
        t = torch.full((8,), float(rank))
        dist.all_reduce(t, group=singles[rank])
        return torch.equal(t, torch.full((8,), float(rank)))

    def objects():
        objs = [None] * world
        dist.all_gather_object(objs, {"rank": rank})
        lst = [("hello", rank)]
        dist.broadcast_object_list(lst, src=1)
        return objs == [{"rank": r} for r in range(world)] and lst == [("hello", 1)]

    def megatron_a2a():
        in_sizes = MC_SPLITS[cl_rank]
        out_sizes = [MC_SPLITS[j][cl_rank] for j in range(2)]
        x = torch.arange(sum(in_sizes) * MC_WIDTH, dtype=torch.float32).reshape(-1, MC_WIDTH)
        x = (x + 100 * rank).requires_grad_(True)
        y = mappings.all_to_all(cluster, x, out_sizes, in_sizes)
        cl_ranks = [rank - cl_rank, rank - cl_rank + 1]
        src_rows = [
            (torch.arange(sum(MC_SPLITS[j]) * MC_WIDTH, dtype=torch.float32)
             .reshape(-1, MC_WIDTH) + 100 * cl_ranks[j])[
                sum(MC_SPLITS[j][:cl_rank]):sum(MC_SPLITS[j][:cl_rank + 1])]
            for j in range(2)
        ]
        ok = torch.equal(y.detach(), torch.cat(src_rows))
        (y * float(rank + 1)).sum().backward()  # backward: a second all_to_all_single
        expect_grad = torch.cat([
            torch.full((in_sizes[j], MC_WIDTH), float(cl_ranks[j] + 1)) for j in range(2)
        ])
        return ok and torch.equal(x.grad, expect_grad)

    def megatron_bound_gather():
        # mappings binds dist_all_gather_func = torch.distributed.all_gather_into_tensor at
        # import time; the recorder must catch calls through that module attribute
        patched = mappings.dist_all_gather_func is not mc_gather_orig
        x = torch.full((2, 3), float(rank))
        y = mappings._gather_along_first_dim(x, fed)
        lo, hi = sorted((rank, fed_peer))
        expect = torch.cat([torch.full((2, 3), float(lo)), torch.full((2, 3), float(hi))])
        return patched and torch.equal(y, expect)

    def torch_nn_functional():
        from torch.distributed.nn import functional as dnnf

        x = torch.ones(2, requires_grad=True)
        y = dnnf.all_reduce(x * (rank + 1), group=cluster)
        y.sum().backward()
        return torch.equal(y.detach(), torch.full((2,), float(rank + cl_peer + 2))) and \
            torch.equal(x.grad, torch.full((2,), float(2 * (rank + 1))))

    steps = [
        ("ar_intra", ar_intra), ("ar_fed", ar_fed), ("a2a_single", a2a_single),
        ("a2a_equal_list", a2a_equal_list), ("gathers", gathers),
        ("reduce_scatters", reduce_scatters), ("chain", chain), ("singleton", singleton),
        ("objects", objects), ("megatron_a2a", megatron_a2a),
        ("megatron_bound_gather", megatron_bound_gather),
        ("torch_nn_functional", torch_nn_functional),
    ]
    # Another tool's (*args, **kwargs) shims (a profiler, a debugging wrapper), installed
    # before the first recorder of this process: the recorder must still bind the arguments by
    # torch's parameter names, and still catch mappings' import-time binding of torch's own
    # all_gather_into_tensor, which the shim does not replace.
    shim_calls = []

    def shimmed(op):
        real = getattr(dist, op)

        def shim(*args, **kwargs):
            shim_calls.append(op)
            return real(*args, **kwargs)

        return shim

    shims = {op: shimmed(op) for op in ("all_to_all_single", "all_gather_into_tensor")}
    for op, shim in shims.items():
        setattr(dist, op, shim)
    try:
        run("shimmed", lambda: a2a_single() and megatron_bound_gather())
        shim_kept = all(getattr(dist, op) is shim for op, shim in shims.items())
    finally:
        for op in shims:
            setattr(dist, op, originals[op])

    # an outer recorder around per-check inner recorders: nesting records in both
    with CommRecorder(group_kinds=KINDS, node_of_rank=NODES) as outer:
        for name, fn in steps:
            run(name, fn)
    after = {op: getattr(dist, op) is originals[op] for op in PATCHED_OPS}
    after["mappings.dist_all_gather_func"] = mappings.dist_all_gather_func is mc_gather_orig
    # calls after exit are not recorded
    n_outer = len(outer.records)
    dist.all_reduce(torch.ones(1))
    not_recorded_after = len(outer.records) == n_outer
    # an exception inside the region still restores everything
    try:
        with CommRecorder():
            raise KeyError("boom")
    except KeyError:
        pass
    after_exc = all(getattr(dist, op) is originals[op] for op in PATCHED_OPS)
    after_exc = after_exc and mappings.dist_all_gather_func is mc_gather_orig

    gathered = gather_summaries(outer, by="op_kind")
    result = {
        "rank": rank,
        "checks": checks,
        "order": [name for name, _ in steps],
        "outer_records": [r.to_dict() for r in outer.records],
        "summary_op": outer.summary("op"),
        "summary_kind": outer.summary("kind"),
        "summary_op_kind": outer.summary("op_kind"),
        "gathered": gathered,
        "restored": after,
        "not_recorded_after": not_recorded_after,
        "restored_after_exception": after_exc,
        "shim": {"calls": shim_calls, "kept": shim_kept},
    }
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("comm")
    port = _free_port()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("LOCAL_WORLD_SIZE", None)
    t0 = time.time()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(WORLD), str(port), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    print(f"4-rank comm recorder launch: {time.time() - t0:.1f}s")
    failed = {r: logs[r][-3000:] for r, p in enumerate(procs) if p.returncode != 0}
    assert not failed, "\n".join(f"== rank {r} failed:\n{log}" for r, log in failed.items())
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _recs(res: dict, check: str) -> list[dict]:
    return res["checks"][check]["records"]


def _exact(rec: dict) -> tuple[Fraction, Fraction]:
    return Fraction(rec["bytes_exact"]), Fraction(rec["cross_node_bytes_exact"])


def _ring(rank: int, ranks: tuple[int, ...], sent: Fraction) -> Fraction:
    succ = ranks[(ranks.index(rank) + 1) % len(ranks)]
    return sent if NODES[succ] != NODES[rank] else Fraction(0)


def _check(rec: dict, op: str, ranks, kind: str, sent, cross, spans: bool) -> None:
    assert rec["op"] == op
    assert tuple(rec["group_ranks"]) == tuple(ranks)
    assert rec["group_kind"] == kind
    assert rec["spans_nodes"] is spans
    assert _exact(rec) == (Fraction(sent), Fraction(cross)), rec
    assert rec["seconds"] >= 0.0


def test_collective_outputs_unchanged(results):
    for res in results:
        bad = [name for name, c in res["checks"].items() if not c["ok"]]
        assert not bad, f"rank {res['rank']}: wrong collective results in {bad}"


def test_all_reduce_bytes(results):
    for res in results:
        r = res["rank"]
        cl = (0, 1) if r < 2 else (2, 3)
        fed = (r % 2, r % 2 + 2)
        (a,) = _recs(res, "ar_intra")
        _check(a, "all_reduce", cl, "cluster_ep", 24, 0, False)  # 2*(1/2)*6*4
        (b,) = _recs(res, "ar_fed")  # async_op=True, float64: 2*(1/2)*40
        _check(b, "all_reduce", fed, "federation", 40, 40, True)


def test_all_to_all_bytes(results):
    for res in results:
        r = res["rank"]
        (a,) = _recs(res, "a2a_single")
        row = A2A_WIDTH * 4
        sent = sum(A2A_SPLITS[r][j] * row for j in range(WORLD) if j != r)
        cross = sum(A2A_SPLITS[r][j] * row for j in range(WORLD) if NODES[j] != NODES[r])
        assert 0 < cross < sent
        _check(a, "all_to_all_single", (0, 1, 2, 3), "token_dp", sent, cross, True)
        single, lst = _recs(res, "a2a_equal_list")
        fed = (r % 2, r % 2 + 2)
        _check(single, "all_to_all_single", fed, "federation", 8, 8, True)  # 2 of 4 int32
        _check(lst, "all_to_all", fed, "federation", 12, 12, True)  # 3 int32 to the peer


def test_gather_and_reduce_scatter_bytes(results):
    for res in results:
        r = res["rank"]
        fed = (r % 2, r % 2 + 2)
        cl = (0, 1) if r < 2 else (2, 3)
        world = (0, 1, 2, 3)
        agt, ag = _recs(res, "gathers")
        _check(agt, "all_gather_into_tensor", world, "token_dp", 96, _ring(r, world, 96), True)
        _check(ag, "all_gather", fed, "federation", 6, 6, True)  # (2-1) * 3 fp16
        rst, rs = _recs(res, "reduce_scatters")
        _check(rst, "reduce_scatter_tensor", fed, "federation", 8, 8, True)  # 1/2 * 16
        _check(rs, "reduce_scatter", cl, "cluster_ep", 40, 0, False)  # 1/2 * 2*5*8


def test_broadcast_reduce_fractions_and_non_members(results):
    for res in results:
        r = res["rank"]
        recs = _recs(res, "chain")
        world = (0, 1, 2, 3)
        red = recs[-1]
        _check(red, "reduce", world, "token_dp", Fraction(3 * 24, 4),
               _ring(r, world, Fraction(72, 4)), True)
        if r == 3:  # not a member of [0, 1, 2]: nothing recorded for it
            assert len(recs) == 1
            continue
        ar, bc, _ = recs
        g = (0, 1, 2)
        _check(ar, "all_reduce", g, "ep", 16, _ring(r, g, 16), True)  # 2*(2/3)*12
        sent = Fraction(2 * 16, 3)  # (3-1)/3 * 4 float32: not an integer
        _check(bc, "broadcast", g, "ep", sent, _ring(r, g, sent), True)
        assert bc["bytes"] == pytest.approx(float(sent))


def test_size_one_groups_not_recorded_and_objects_counted(results):
    for res in results:
        assert _recs(res, "singleton") == []
        ag, bc = _recs(res, "objects")
        _check(ag, "all_gather_object", (0, 1, 2, 3), "token_dp", 0, 0, True)
        _check(bc, "broadcast_object_list", (0, 1, 2, 3), "token_dp", 0, 0, True)


def test_megatron_call_sites(results):
    for res in results:
        r = res["rank"]
        cl = (0, 1) if r < 2 else (2, 3)
        fwd, bwd = _recs(res, "megatron_a2a")
        me = r % 2
        row = MC_WIDTH * 4
        fwd_sent = MC_SPLITS[me][1 - me] * row
        bwd_sent = MC_SPLITS[1 - me][me] * row  # backward sends with the output splits
        _check(fwd, "all_to_all_single", cl, "cluster_ep", fwd_sent, 0, False)
        _check(bwd, "all_to_all_single", cl, "cluster_ep", bwd_sent, 0, False)
        (g,) = _recs(res, "megatron_bound_gather")  # via mappings.dist_all_gather_func
        fed = (r % 2, r % 2 + 2)
        _check(g, "all_gather_into_tensor", fed, "federation", 24, 24, True)
        fwd, bwd = _recs(res, "torch_nn_functional")  # torch.distributed.nn autograd
        _check(fwd, "all_reduce", cl, "cluster_ep", 8, 0, False)
        _check(bwd, "all_reduce", cl, "cluster_ep", 8, 0, False)


def test_counts_through_another_tools_shim(results):
    """With (*args, **kwargs) shims installed first, the shims still run and the recorder
    counts exactly what it counts without them."""
    def facts(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in rec.items() if k != "seconds"} for rec in records]

    for res in results:
        plain = _recs(res, "a2a_single") + _recs(res, "megatron_bound_gather")
        assert len(plain) == 2 and facts(_recs(res, "shimmed")) == facts(plain)
        assert res["shim"] == {"calls": ["all_to_all_single"], "kept": True}


def test_nesting_summary_and_gather(results):
    for res in results:
        inner = [rec for name in res["order"] for rec in res["checks"][name]["records"]]
        outer = res["outer_records"]
        key = ("op", "group_ranks", "group_kind", "bytes_exact", "cross_node_bytes_exact")
        assert [[o[k] for k in key] for o in outer] == [[i[k] for k in key] for i in inner]
        want: dict[str, list] = {}
        for rec in outer:
            w = want.setdefault(f"{rec['op']}@{rec['group_kind']}", [Fraction(0), Fraction(0), 0])
            w[0] += Fraction(rec["bytes_exact"])
            w[1] += Fraction(rec["cross_node_bytes_exact"])
            w[2] += 1
        got = res["summary_op_kind"]
        assert sorted(got) == sorted(want)
        for k, (b, c, n) in want.items():
            assert got[k]["calls"] == n
            for field, v in (("bytes", b), ("cross_node_bytes", c)):
                if v.denominator == 1:
                    assert got[k][field] == int(v) and isinstance(got[k][field], int)
                else:
                    assert got[k][field] == pytest.approx(float(v))
        by_op, by_kind = res["summary_op"], res["summary_kind"]
        assert sum(v["calls"] for v in by_op.values()) == len(outer)
        assert sum(v["calls"] for v in by_kind.values()) == len(outer)
        assert set(by_kind) <= {"cluster_ep", "federation", "token_dp", "ep"}
        assert by_op["all_to_all_single"]["calls"] == 4  # a2a, equal split, megatron fwd+bwd
        # gather_summaries: every rank sees every rank's summary, not counting itself
        assert res["gathered"] == [x["summary_op_kind"] for x in results]


def test_patches_restored(results):
    for res in results:
        assert all(res["restored"].values()), res["restored"]
        assert res["not_recorded_after"]
        assert res["restored_after_exception"]


def test_in_process_restore_and_errors():
    import torch.distributed as d

    before = {op: getattr(d, op) for op in PATCHED_OPS}
    rec = CommRecorder(node_of_rank=lambda r: 0)
    with pytest.raises(RuntimeError):
        with rec:
            assert all(getattr(d, op) is not before[op] for op in PATCHED_OPS)
            raise RuntimeError("x")
    assert all(getattr(d, op) is before[op] for op in PATCHED_OPS)
    assert rec.summary() == {} and gather_summaries(rec) == [{}]
    with pytest.raises(ValueError):
        rec.summary(by="group")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
