"""Replay a denoiser's forward from a captured CUDA graph: one launch per forward instead of a few thousand.

GraphedForward wraps any callable. Per input signature (tensor shapes, dtypes, devices, strides; every non-tensor
argument's value; grad mode) it keeps static input buffers, captures the call once on them, and afterwards copies
each call's tensors into those buffers, replays, and returns a clone of the static output (the next replay
overwrites it; a caller that keeps step outputs must not see them change). A new signature captures a new graph
(a true-CFG pipeline alternates two text lengths: both stay captured), so shapes may change between calls.

The graph object is injected (`new_graph`), so the bookkeeping above runs on CPU in tests with a stand-in that
re-runs the captured function on replay; CudaGraph is the real one."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch.utils import _pytree as pytree

WARMUP_CALLS = 2  # before capture, on a side stream: lazy init (cuBLAS workspaces, inductor compiles) must not be captured


class Graph(Protocol):
    def warmup(self, run: Callable[[], Any]) -> None: ...

    def capture(self, run: Callable[[], Any]) -> Any:
        """Record run() on the static buffers; return its (static) output."""
        ...

    def replay(self) -> None: ...


class CudaGraph:
    """torch.cuda.CUDAGraph behind the Graph protocol (the warm-up pattern of torch's CUDA-graph documentation)."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def warmup(self, run: Callable[[], Any]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                run()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, run: Callable[[], Any]) -> Any:
        try:
            with torch.cuda.graph(self.graph):
                return run()
        except Exception as e:
            release_capture_state()
            raise RuntimeError(f"CUDA graph capture failed: {type(e).__name__}: {e}. The graphed forward must not read "
                               "values back to the host (bool(t), t.item(), ...) once warmed up; a model whose forward "
                               "must names a sync-free method as GRAPH_ENTRY (engine/optimize.py)") from e

    def replay(self) -> None:
        self.graph.replay()


def release_capture_state() -> None:
    """After a failed capture: torch registers the default CUDA generator with a graph at capture begin and releases
    it only at a successful capture end, so a failed capture leaves it in capture mode, and every later random draw
    or compiled kernel in the process fails ("Offset increment outside graph capture"): on an H200 one failed cell
    took the two cells after it down. One empty capture on a fresh graph begins and ends capture mode again."""
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        pass


@dataclass
class _Captured:
    graph: Graph
    static: list  # the flattened arguments: static tensors where the call had tensors, the values otherwise
    out: Any


def _leaf_key(x: Any) -> tuple:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device))
    try:
        hash(x)
    except TypeError:
        raise TypeError(f"a graphed forward's non-tensor arguments must be hashable (they are baked into the "
                        f"captured graph); got {type(x).__name__}") from None
    return ("value", x)


class GraphedForward:
    """fn(*args, **kwargs) replayed from a graph captured per input signature; at most `max_graphs` kept (the least
    recently used one is dropped, and its memory pool with it)."""

    def __init__(self, fn: Callable[..., Any], new_graph: Callable[[], Graph] = CudaGraph, max_graphs: int = 4):
        self.fn, self.new_graph, self.max_graphs = fn, new_graph, max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.captures = 0

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (spec, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), *map(_leaf_key, leaves))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(leaves, spec)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            for static, x in zip(entry.static, leaves):
                if isinstance(x, torch.Tensor):
                    static.copy_(x)
        entry.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.out)

    def _capture(self, leaves: list, spec) -> _Captured:
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        graph = self.new_graph()
        graph.warmup(lambda: self.fn(*args, **kwargs))
        out = graph.capture(lambda: self.fn(*args, **kwargs))
        self.captures += 1
        return _Captured(graph, static, out)
