"""bench/scaling.py on a toy loss: the HLO collective counting and the gather strategy's cost.

Compile-only (no timing): the numbers are exact, so the assertions are too.
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import scaling  # noqa: E402


def test_collectives_parses_sync_async_and_tuple_results():
    hlo = "\n".join(
        [
            "  %ag = f32[64,32]{1,0} all-gather(%x), replica_groups={{0,1,2,3}}, dimensions={0}",
            "  %ar = (f32[], bf16[16,16]{1,0}) all-reduce(%a, %b), replica_groups={{0,1,2,3}}",
            "  %rs = f32[4,32]{1,0} reduce-scatter(%y), replica_groups=mesh['a'=4] {'a'}",
            "  %a2a = (f32[2,8]{1,0}, f32[2,8]{1,0}) all-to-all(%p, %q), replica_groups={{0,1}}",
            "  %ags = (f32[16,32]{1,0}, f32[64,32]{1,0}) all-gather-start(%z), dimensions={0}",
            "  %gte = f32[64,32]{1,0} get-tuple-element(%ag), index=0",
        ]
    )
    got = scaling.collectives(hlo, devices=4)
    ops = got["ops"]
    assert ops["all-gather"]["count"] == 2
    # the async start's result holds (operand, result): only the gathered result counts
    assert ops["all-gather"]["payload_bytes"] == 2 * 64 * 32 * 4
    assert ops["all-reduce"]["payload_bytes"] == 4 + 16 * 16 * 2
    assert ops["all-reduce"]["ring_bytes"] == pytest.approx(2 * 3 / 4 * (4 + 512))
    assert ops["reduce-scatter"]["payload_bytes"] == 4 * 4 * 32 * 4  # the unscattered operand
    assert ops["all-to-all"]["ring_bytes"] == pytest.approx(1 / 2 * 2 * 2 * 8 * 4)


def test_scaling_loss_only_matches_the_formulas(tmp_path):
    out = tmp_path / "scaling.json"
    result = scaling.main(
        ["--devices=8", "--no_step", "--dims=256", "--batches=64", f"--json={out}"]
    )
    entries = {e["strategy"]: e for e in result["loss"] if (e["n"], e["d"]) == (64, 256)}
    f = scaling.loss_formulas(64, 256, 8)
    # gather: 1/W of the single-device FLOPs, (N + N/W) D floats each way, psums aside
    assert entries["gather"]["flops"] == pytest.approx(entries["single"]["flops"] / 8, rel=0.05)
    gathered = sum(
        entries["gather"]["collectives"]["ops"][k]["payload_bytes"]
        for k in ("all-gather", "all-to-all", "reduce-scatter")
    )
    assert gathered == f["gather_fwd_bwd_payload"]
    assert (
        entries["allreduce"]["collectives"]["ops"]["all-reduce"]["payload_bytes"]
        >= (f["allreduce_payload"])
    )
    assert json.loads(out.read_text())["loss"]
