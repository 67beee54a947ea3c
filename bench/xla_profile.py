"""Where a compiled step spends its time: a jax.profiler trace, summed per XLA operation.

    ops = trace_ops(lambda: run(2), steps=2, trace_dir="/tmp/bt_trace", hlo=compiled.as_text())

Each row is one operation of the optimised HLO module (a fusion, a convolution, a
collective ...) with its wall time per step summed over the trace's events, its result
shape and the JAX op it came from (HLO metadata), and a coarse kind. On CPU the events are
the thunks XLA runs; work a thunk hands to a thread pool (Eigen convolutions) may be
counted only partly, so the shares are a guide, not an account. The trace itself (open it
in Perfetto or TensorBoard) stays in trace_dir.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _kind(name: str, shape: str, rest: str) -> str:
    if "transpose" in name:
        return "transpose (with what XLA fused into it)"
    if re.search(r"\[\d+,\d+,\d+,\d+\]", shape) and re.search(r"\[\d+,[13],[13],\d+\]", shape):
        return "convolution weight gradient"
    if " convolution(" in f" {rest}" or "conv_general_dilated" in rest:
        return "convolution"
    if "dot_general" in rest:
        return "dot"
    if name.startswith(("all-", "psum", "reduce-scatter", "collective")):
        return "collective"
    return "other fusion (BN, ReLU, loss, optimizer)"


def trace_ops(run, *, steps: int, trace_dir: str, hlo: str, top: int = 12) -> dict:
    """Trace run() (which runs `steps` steps and blocks) and sum the time per HLO op."""
    import jax

    definitions = {}
    for line in hlo.splitlines():
        m = _DEFINITION.match(line)
        if m:
            definitions.setdefault(m.group(1), (m.group(2), m.group(3)))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run()
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[-1:]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in definitions:
            per_op[e["name"]] += e.get("dur", 0) / 1e3 / steps  # microseconds -> ms per step
    kinds = collections.Counter()
    for name, ms in per_op.items():
        shape, rest = definitions[name]
        kinds[_kind(name, shape, rest)] += ms
    rows = []
    for name, ms in per_op.most_common(top):
        shape, rest = definitions[name]
        origin = _OP_NAME.search(rest)
        rows.append([name, ms, shape.split("{")[0], origin.group(1)[-70:] if origin else ""])
    return {"ms_per_step_by_kind": dict(kinds.most_common()), "top_ops": rows, "trace": path}
