"""Record every torch.distributed collective issued in a region, with exact byte counts.

    with CommRecorder(group_kinds={(0, 2): "federation", (0, 1): "cluster_ep"},
                      node_of_rank=[0, 0, 1, 1]) as rec:
        train_step()
    rec.records                  # one CollectiveRecord per recorded call, in issue order
    rec.summary(by="op_kind")    # {"all_reduce@federation": {"bytes", "cross_node_bytes", ...}}
    gather_summaries(rec)        # every rank's summary, on every rank

Byte definitions
----------------
``bytes`` is what THIS rank sends on the wire for the call, as a deterministic function of the
call's arguments (so formulas can predict it exactly). n is the group size, ``nbytes(t)`` is
``t.numel() * t.element_size()``. Values are kept as ``fractions.Fraction``.

- all_to_all_single(output, input, output_split_sizes, input_split_sizes): ``input`` is cut
  along dim 0 into n chunks, of ``input_split_sizes`` rows (list, tuple, numpy array or tensor)
  or of ``input.shape[0] / n`` rows when none is given; bytes = the chunks destined to the other
  n-1 group ranks (the own chunk is excluded). all_to_all(outputs, inputs): bytes = sum of
  ``nbytes(inputs[j])`` over the other group ranks j. For both, ``cross_node_bytes`` is the part
  of those chunks destined to ranks on another node.
- all_reduce: ring algorithm, ``2 (n-1)/n * nbytes(tensor)``.
- all_gather(list, tensor), all_gather_into_tensor / _all_gather_base(out, in):
  ``(n-1) * nbytes(input)``.
- reduce_scatter_tensor / _reduce_scatter_base(out, in): ``(n-1)/n * nbytes(in)``;
  reduce_scatter(out, in_list): ``(n-1)/n * sum(nbytes(t) for t in in_list)``.
- broadcast, reduce: pipelined chain, ``(n-1)/n * nbytes(tensor)`` on every rank (the chain's
  per-rank average; the same on the source/destination as on the others).
- Ring-style ops (all of the above except the all-to-alls): ``cross_node_bytes`` = all of
  ``bytes`` when this rank's ring successor (the next group rank, wrapping) sits on another
  node, else 0.
- all_gather_object, broadcast_object_list: counted as calls with 0 bytes. They are control
  plane (pickled metadata), and their size depends on pickling, not on tensor shapes.

A call is recorded only when it communicates: calls on a group of size 1, and calls on a group
this rank is not a member of, are not recorded. Async calls (``async_op=True``) are recorded at
issue; ``seconds`` is the time until the call returns (for async calls, not the completion).

What is patched
---------------
On enter, the recorder replaces the functions above in the ``torch.distributed`` namespace,
which catches every call written ``torch.distributed.X(...)`` / ``dist.X(...)`` at call time:
megatron-core's ``tensor_parallel.mappings`` (``_reduce``, ``_AllToAll`` forward and backward,
``all_gather``/``reduce_scatter``), ``transformer.moe.token_dispatcher`` (through mappings'
``all_to_all`` and ``gather_from_sequence_parallel_region``), ``distributed.finalize_model_grads``
and ``distributed.param_and_grad_buffer``'s ``torch.distributed.all_reduce``, and torch's
``torch.distributed.nn.functional`` autograd collectives. Some modules bind a function at import
time instead: megatron-core's ``tensor_parallel.mappings``, ``tensor_parallel.layers``,
``tensor_parallel.utils``, ``distributed.param_and_grad_buffer``, ``transformer.
multi_token_prediction``, ``timers`` and ``utils`` hold ``dist_all_gather_func =
torch.distributed.all_gather_into_tensor`` and ``dist_reduce_scatter_func =
torch.distributed.reduce_scatter_tensor`` (the DDP bucket reduce-scatter and the sequence-parallel
gathers go through them). To catch those, and any ``from torch.distributed import X``, every
loaded module (except ``torch.distributed.distributed_c10d`` itself, whose functions call each
other by global name) is scanned and each module attribute that *is* one of the original
functions is replaced too. On exit exactly the replaced attributes are restored, and wrappers
that leaked into modules imported during the region are swapped back to the originals; a
wrapper called while no recorder is active just calls the original.

Other tools' wrappers: when ``torch.distributed.X`` is already another tool's wrapper (a
profiler, a debugging shim ``def shim(*args, **kwargs)``), the recorder wraps that wrapper, which
keeps running, and also torch's own ``distributed_c10d.X`` where modules bound it before the
shim went in. Every call is bound against torch's own signature of X, captured once at import,
so byte counting never depends on the signature of whatever was installed first.

A collective issued from inside another patched collective (e.g. torch internals) is recorded
once, as the outer call. Not seen: collectives issued from C++ (torch's own
``nn.parallel.DistributedDataParallel`` reducer, ``_broadcast_coalesced``), functional
collectives dispatched to ``torch.ops._c10d_functional`` (DTensor, ``funcol``; only their eager
``legacy_*`` fallbacks, which alias the functions above, are caught), point-to-point ops and
barriers.

Recorders nest: each active recorder records every call; patches are installed by the first
enter and removed by the last exit (also on exceptions).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from foe_train.topology import placed_node

__all__ = [
    "PATCHED_OPS",
    "CollectiveRecord",
    "CommRecorder",
    "gather_summaries",
]

# op name -> how its bytes are counted
_A2A_SINGLE, _A2A_LIST, _ALL_REDUCE, _GATHER, _RS_TENSOR, _RS_LIST, _CHAIN, _OBJECT = range(8)
_OP_KIND: dict[str, int] = {
    "all_reduce": _ALL_REDUCE,
    "all_to_all_single": _A2A_SINGLE,
    "all_to_all": _A2A_LIST,
    "all_gather": _GATHER,
    "all_gather_into_tensor": _GATHER,
    "_all_gather_base": _GATHER,
    "reduce_scatter_tensor": _RS_TENSOR,
    "_reduce_scatter_base": _RS_TENSOR,
    "reduce_scatter": _RS_LIST,
    "broadcast": _CHAIN,
    "reduce": _CHAIN,
    "all_gather_object": _OBJECT,
    "broadcast_object_list": _OBJECT,
}
PATCHED_OPS: tuple[str, ...] = tuple(_OP_KIND)
# name of the input argument that is sent, per op
_INPUT_ARG = {
    "all_reduce": "tensor", "all_to_all_single": "input", "all_to_all": "input_tensor_list",
    "all_gather": "tensor", "all_gather_into_tensor": "input_tensor",
    "_all_gather_base": "input_tensor", "reduce_scatter_tensor": "input",
    "_reduce_scatter_base": "input", "reduce_scatter": "input_list", "broadcast": "tensor",
    "reduce": "tensor",
}
_C10D_MODULE = c10d.__name__
# torch's own signatures, taken once at import: calls are bound against these, never against
# whatever torch.distributed holds when a recorder starts, which may be another tool's
# ``(*args, **kwargs)`` shim (a profiler, a debugging wrapper) that hides the parameter names.
_SIGNATURES: dict[str, inspect.Signature] = {
    op: inspect.signature(getattr(c10d, op)) for op in PATCHED_OPS
}


@dataclass
class CollectiveRecord:
    """One recorded collective call, as seen by this rank."""

    op: str
    group_kind: str
    group_ranks: tuple[int, ...]  # global ranks, in group-rank order
    spans_nodes: bool
    bytes: Fraction  # sent by this rank (see module docstring)
    cross_node_bytes: Fraction  # the part of `bytes` that goes to another node
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: bytes as int when integral else float, plus exact "p/q" strings."""
        d = asdict(self)
        d["group_ranks"] = list(self.group_ranks)
        d["bytes"] = _num(self.bytes)
        d["cross_node_bytes"] = _num(self.cross_node_bytes)
        d["bytes_exact"] = str(Fraction(self.bytes))
        d["cross_node_bytes_exact"] = str(Fraction(self.cross_node_bytes))
        return d


def _num(x: Fraction | int) -> int | float:
    x = Fraction(x)
    return int(x) if x.denominator == 1 else float(x)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _split_list(sizes: Any) -> list[int] | None:
    """input_split_sizes as a list of ints; None when absent or empty (equal split)."""
    if sizes is None:
        return None
    if torch.is_tensor(sizes):
        sizes = sizes.tolist()
    sizes = [int(s) for s in sizes]  # list, tuple, numpy array
    return sizes or None


def _default_node_of_rank() -> Callable[[int], int]:
    lws = os.environ.get("LOCAL_WORLD_SIZE")
    if lws and int(lws) > 0:
        return functools.partial(placed_node, ranks_per_node=int(lws))
    return lambda r: 0


# ---------------------------------------------------------------------------------------------
# global patch state, shared by all active recorders
# ---------------------------------------------------------------------------------------------
_lock = threading.RLock()
_active: list[CommRecorder] = []
_wrappers: dict[int, tuple[Callable, Callable]] = {}  # id(wrapped) -> (wrapped, its wrapper)
_patched: list[tuple[Any, str, Any]] = []  # (namespace, attribute, original value)
_group_cache: dict[int, tuple[Any, tuple[int, ...]]] = {}
_tls = threading.local()


def _group_ranks(group: Any) -> tuple[int, ...]:
    """Global ranks of a group, ordered by group rank."""
    hit = _group_cache.get(id(group))
    if hit is not None and hit[0] is group:
        return hit[1]
    ranks = dist.get_process_group_ranks(group)
    ordered = tuple(sorted(ranks, key=lambda r: dist.get_group_rank(group, r)))
    _group_cache[id(group)] = (group, ordered)
    return ordered


def _not_member(group: Any) -> bool:
    return isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER


def _make_wrapper(op: str, original: Callable) -> Callable:
    sig = _SIGNATURES[op]

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _active or getattr(_tls, "depth", 0) > 0:
            return original(*args, **kwargs)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # let the original raise its own error
        bound.apply_defaults()
        _tls.depth = 1
        try:
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            seconds = time.perf_counter() - t0
        finally:
            _tls.depth = 0
        group = bound.arguments.get("group")
        if _not_member(group):
            return out
        if group is None:
            group = dist.group.WORLD
        ranks = _group_ranks(group)
        if len(ranks) > 1:
            for rec in list(_active):
                rec._record(op, bound.arguments, ranks, seconds)
        return out

    wrapper.__foe_comm_wrapper__ = True  # type: ignore[attr-defined]
    return wrapper


def _is_wrapper(value: Any) -> bool:
    try:
        return getattr(value, "__foe_comm_wrapper__", False) is True
    except Exception:  # odd objects with failing __getattr__
        return False


def _module_dicts() -> list[tuple[Any, dict]]:
    out = []
    for name, mod in list(sys.modules.items()):
        if mod is None or name == _C10D_MODULE:
            continue
        d = getattr(mod, "__dict__", None)
        if isinstance(d, dict):
            out.append((mod, d))
    return out


def _install() -> None:
    """Wrap, for every op, what torch.distributed holds now and torch's own function (which
    modules that bound it before another tool's shim went in still hold), wherever a loaded
    module refers to either."""
    _wrappers.clear()
    for op in PATCHED_OPS:
        for fn in (getattr(dist, op), getattr(c10d, op)):
            if _is_wrapper(fn):  # should not happen; never wrap a wrapper
                raise RuntimeError(f"torch.distributed.{op} is already wrapped by CommRecorder")
            if id(fn) not in _wrappers:
                _wrappers[id(fn)] = (fn, _make_wrapper(op, fn))
    for mod, d in _module_dicts():
        for attr, value in list(d.items()):
            hit = _wrappers.get(id(value))
            if hit is not None and value is hit[0]:
                _patched.append((mod, attr, value))
    for mod, attr, value in _patched:
        setattr(mod, attr, _wrappers[id(value)][1])


def _uninstall() -> None:
    for mod, attr, value in reversed(_patched):
        setattr(mod, attr, value)
    _patched.clear()
    # wrappers captured by modules imported while recording (e.g. `from torch.distributed
    # import all_reduce`) go back to what they wrapped
    originals = {id(wrapper): (wrapper, fn) for fn, wrapper in _wrappers.values()}
    for mod, d in _module_dicts():
        for attr, value in list(d.items()):
            hit = originals.get(id(value))
            if hit is not None and value is hit[0]:
                setattr(mod, attr, hit[1])
    _group_cache.clear()


# ---------------------------------------------------------------------------------------------
# the recorder
# ---------------------------------------------------------------------------------------------
class CommRecorder:
    """Context manager recording the torch.distributed collectives this rank issues.

    group_kinds: global-rank tuple of a group (in group-rank order, i.e. sorted for groups made
        by ``new_group``) -> kind name ("federation", "cluster_ep", "token_dp", "expert_dp",
        "ep", "dp", ...). Groups not listed are of kind "other".
    node_of_rank: global rank -> node index, as a callable or a list. Default:
        LOCAL_WORLD_SIZE consecutive ranks per node when that variable is set (torchrun's
        placement, ``topology.placed_node``), else every rank on node 0.
    """

    def __init__(
        self,
        group_kinds: dict[tuple[int, ...], str] | None = None,
        node_of_rank: Callable[[int], int] | Sequence[int] | None = None,
    ) -> None:
        self.group_kinds = {tuple(int(r) for r in k): v for k, v in (group_kinds or {}).items()}
        if node_of_rank is None:
            self._node_of: Callable[[int], int] = _default_node_of_rank()
        elif callable(node_of_rank):
            self._node_of = node_of_rank
        else:
            table = [int(n) for n in node_of_rank]
            self._node_of = table.__getitem__
        self.records: list[CollectiveRecord] = []
        self._entered = False

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> CommRecorder:
        with _lock:
            if self._entered:
                raise RuntimeError("this CommRecorder is already active")
            if not _active:
                try:
                    _install()
                except BaseException:
                    _uninstall()
                    raise
            _active.append(self)
            self._entered = True
        return self

    def __exit__(self, *exc: Any) -> None:
        with _lock:
            if self in _active:
                _active.remove(self)
            self._entered = False
            if not _active:
                _uninstall()

    @property
    def active(self) -> bool:
        return self._entered

    # -- accounting ---------------------------------------------------------------------------
    def node_of(self, rank: int) -> int:
        return int(self._node_of(int(rank)))

    def _record(
        self, op: str, args: dict[str, Any], ranks: tuple[int, ...], seconds: float
    ) -> None:
        me = ranks.index(dist.get_rank())
        sent, cross = self.count_bytes(op, args, ranks, me)
        nodes = {self.node_of(r) for r in ranks}
        self.records.append(CollectiveRecord(
            op=op,
            group_kind=self.group_kinds.get(ranks, "other"),
            group_ranks=ranks,
            spans_nodes=len(nodes) > 1,
            bytes=sent,
            cross_node_bytes=cross,
            seconds=seconds,
        ))

    def count_bytes(
        self, op: str, args: dict[str, Any], ranks: tuple[int, ...], me: int
    ) -> tuple[Fraction, Fraction]:
        """(bytes sent, cross-node bytes) of one call; ``args`` are the call's bound arguments
        by parameter name, ``ranks`` the group's global ranks, ``me`` this rank's group rank."""
        kind = _OP_KIND[op]
        n = len(ranks)
        zero = Fraction(0)
        if kind == _OBJECT:
            return zero, zero
        src = args[_INPUT_ARG[op]]
        my_node = self.node_of(ranks[me])
        if kind in (_A2A_SINGLE, _A2A_LIST):
            if kind == _A2A_SINGLE:
                rows = int(src.shape[0]) if src.dim() > 0 else 0
                row_bytes = Fraction(_nbytes(src), rows) if rows else zero
                splits = _split_list(args.get("input_split_sizes"))
                if splits is None:
                    per = Fraction(rows, n)
                    chunk = [per * row_bytes] * n
                else:
                    chunk = [s * row_bytes for s in splits]
            else:
                chunk = [Fraction(_nbytes(t)) for t in src]
            sent = sum((chunk[j] for j in range(n) if j != me), zero)
            cross = sum(
                (chunk[j] for j in range(n) if j != me and self.node_of(ranks[j]) != my_node),
                zero,
            )
            return sent, cross
        if kind == _ALL_REDUCE:
            sent = Fraction(2 * (n - 1) * _nbytes(src), n)
        elif kind == _GATHER:
            sent = Fraction((n - 1) * _nbytes(src))
        elif kind == _RS_TENSOR:
            sent = Fraction((n - 1) * _nbytes(src), n)
        elif kind == _RS_LIST:
            sent = Fraction((n - 1) * sum(_nbytes(t) for t in src), n)
        else:  # _CHAIN
            sent = Fraction((n - 1) * _nbytes(src), n)
        successor = ranks[(me + 1) % n]
        cross = sent if self.node_of(successor) != my_node else zero
        return sent, cross

    def summary(self, by: str = "op") -> dict[str, dict[str, int | float]]:
        """Totals per key: {"bytes", "cross_node_bytes", "calls", "seconds"}. ``by``: "op",
        "kind" (group kind) or "op_kind" ("op@kind"). Byte sums are ints when integral."""
        if by not in ("op", "kind", "op_kind"):
            raise ValueError(f"summary(by=...) must be 'op', 'kind' or 'op_kind', not {by!r}")
        acc: dict[str, list] = {}
        for r in self.records:
            key = r.op if by == "op" else r.group_kind if by == "kind" else f"{r.op}@{r.group_kind}"
            a = acc.setdefault(key, [Fraction(0), Fraction(0), 0, 0.0])
            a[0] += r.bytes
            a[1] += r.cross_node_bytes
            a[2] += 1
            a[3] += r.seconds
        return {
            k: {"bytes": _num(a[0]), "cross_node_bytes": _num(a[1]), "calls": a[2],
                "seconds": a[3]}
            for k, a in sorted(acc.items())
        }

    def clear(self) -> None:
        self.records.clear()


def gather_summaries(recorder: CommRecorder, by: str = "op") -> list[dict]:
    """Every rank's ``recorder.summary(by)``, indexed by global rank, on every rank.

    A collective over the default group (all ranks must call it). It uses the original
    ``all_gather_object``, so it is never recorded, even when called inside a recorded region.
    Without an initialized process group, returns ``[recorder.summary(by)]``.
    """
    mine = recorder.summary(by)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    c10d.all_gather_object(out, mine)  # torch's own: never wrapped (see _module_dicts)
    return out
