"""Keeps the GPU path honest without a GPU: every tensor the package creates names its device,
host reads (``.cpu()``, ``.item()``, ``.tolist()``) happen only where listed with a reason,
and no collective gets a tensor made on the host. NCCL takes only CUDA tensors, so each
offender here is a job that would fail (or stall) on GPUs while every CPU test passes."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "foe_train"
CONSTRUCTORS = {"tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand",
                "randint", "linspace", "eye", "as_tensor"}
HOST_READS = {"cpu", "item", "tolist", "numpy"}
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter", "broadcast", "all_to_all_single", "all_to_all", "send", "recv",
               "reduce", "gather", "scatter"}

# (module, function): why the host is right there
ALLOWED = {
    ("compat", "_move_to_cpu"): "the CPU patch itself (never active with CUDA)",
    ("compat", "_causal_mask"): "the CPU patch itself",
    ("model.oracle", "*"): "the independent reference model, run on the host by tests",
    ("model.builder", "init_weights"): "weights drawn on the host from a per-name generator, "
                                       "so every topology and device gets the same values",
    ("model.builder", "gather_cluster_state_dicts"): "host copies gathered as objects",
    ("infer.generate", "choose"): "top-p draws from per-prompt host generators",
    ("infer.generate", "generate"): "the token ids handed back to the caller",
    ("train.step", "Meters.read"): "the one host read per logging interval",
    ("bench.latency", "_prompts"): "prompts drawn from a host generator, then moved",
    ("bench.latency", "expert_imbalance"): "one read of the routed counts per report row, "
                                           "after the timed requests",
    ("bench.comm_run", "main"): "prompts drawn from a host generator, then moved",
    ("bench.train_bench", "measure"): "one read of the steps' CPU times summed over ranks, "
                                      "after the timed steps",
    ("bench.comm", "_split_list"): "the recorder reads all-to-all split sizes to count bytes",
    ("model.dispatcher", "SingleRankTokenDispatcher.dispatch_postprocess"):
        "the per-expert token counts the experts split their input by, on the host as in "
        "megatron's own dispatcher: the MoE layer's one synchronisation",
}


def _name(node: ast.AST) -> str:
    """Dotted source text of a call target (``torch.zeros``, ``x.cpu``)."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


class _Scan(ast.NodeVisitor):
    def __init__(self, module: str) -> None:
        self.module, self.scope, self.found = module, [], []
        self.hosted: set[str] = set()  # names bound to host tensors in the current function

    def _report(self, node: ast.AST, what: str) -> None:
        where = ".".join(self.scope) or "<module>"
        self.found.append((self.module, where, f"{self.module}.{where}:{node.lineno}: {what}"))

    def _scoped(self, node: ast.AST) -> None:
        self.scope.append(node.name)
        outer, self.hosted = self.hosted, set()
        self.generic_visit(node)
        self.scope.pop()
        self.hosted = outer

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def _host_made(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.hosted
        if not isinstance(node, ast.Call):
            return False
        target = _name(node.func)
        if target.startswith("torch.") and target.split(".")[-1] in CONSTRUCTORS:
            return not any(k.arg == "device" for k in node.keywords)
        return isinstance(node.func, ast.Attribute) and node.func.attr in HOST_READS

    def visit_Assign(self, node: ast.Assign) -> None:
        if self._host_made(node.value):
            self.hosted.update(t.id for t in node.targets if isinstance(t, ast.Name))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        target = _name(node.func)
        last = target.split(".")[-1]
        if target.startswith("torch.") and last in CONSTRUCTORS and target.count(".") == 1:
            if not any(k.arg == "device" for k in node.keywords):
                self._report(node, f"{target}(...) without device=")
        elif isinstance(node.func, ast.Attribute) and last in HOST_READS:
            self._report(node, f".{last}() reads the host")
        if target.startswith("dist.") and last in COLLECTIVES:
            if any(self._host_made(a) for a in node.args[:2]):
                self._report(node, f"{target} of a host tensor")
        self.generic_visit(node)


def offenders(source: str, module: str) -> list[tuple[str, str, str]]:
    """(module, function, message) of every device offence in ``source``."""
    scan = _Scan(module)
    scan.visit(ast.parse(source))
    return scan.found


def _allowed(module: str, function: str) -> bool:
    return (module, function) in ALLOWED or (module, "*") in ALLOWED


def test_package_has_no_unlisted_host_tensors():
    found, used = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for mod, function, message in offenders(path.read_text(), module):
            if _allowed(mod, function):
                used.add((mod, function) if (mod, function) in ALLOWED else (mod, "*"))
            else:
                found.append(message)
    assert not found, "tensors on the host where the backend's device is needed:\n" + \
        "\n".join(found)
    assert not set(ALLOWED) - used, f"stale ALLOWED entries: {sorted(set(ALLOWED) - used)}"


def test_planted_offenders_are_caught():
    planted = '''
def agree(flag):
    value = torch.tensor([flag])
    dist.all_reduce(value)

def mean(loss):
    dist.all_reduce(loss.detach().cpu())

def fine(x):
    y = torch.zeros(3, device=x.device)
    dist.all_reduce(y)
'''
    messages = [m for _, _, m in offenders(planted, "planted")]
    assert any("planted.agree:3: torch.tensor(...) without device=" in m for m in messages)
    assert any("planted.agree:4: dist.all_reduce of a host tensor" in m for m in messages)
    assert any("planted.mean:7: dist.all_reduce of a host tensor" in m for m in messages)
    assert not [m for m in messages if "planted.fine" in m]
