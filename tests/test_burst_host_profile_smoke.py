"""benchmarks/burst_host_profile.py end to end on a small shape: the real server on a simulated device, every
request's stages stamped in order, and the simulated device's clock honoured (a read-back waits for it)."""

import json
import time

from benchmarks import burst_host_profile
from benchmarks.simulated_device import SimulatedDevice
from model.engine import SamplingParams


def test_a_small_burst_is_stamped_stage_by_stage(tmp_path, capsys):
    out = tmp_path / "burst.json"
    assert burst_host_profile.main(["--conversations", "4", "--turns", "2", "--system-prompt-len", "64",
                                    "--user-len", "16", "--turn-output-len", "4", "--eager-host-ms", "2",
                                    "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "whole run: 8 requests" in text and "| 2 |" in text
    data = json.loads(out.read_text())
    assert len(data["client"]) == 8 and len(data["server"]["requests"]) == 8
    for r in data["server"]["requests"]:
        stamps = [r[s] for s in burst_host_profile.STAGES[1:-1]]
        assert stamps == sorted(stamps), r
    assert data["server"]["frozen"] > 0, "the server froze its start-up heap"


def test_the_simulated_device_queues_steps_and_the_read_back_waits_for_them():
    from benchmarks.simulated_device import simulated_engine

    device = SimulatedDevice(eager_host_ms=1.0, eager_fixed_ms=30.0, decode_fixed_ms=20.0, decode_host_ms=0.1)
    engine = simulated_engine(device, num_kv_blocks=64)
    engine.add_request("a", list(range(40)), SamplingParams(max_tokens=3, ignore_eos=True, temperature=0))
    start = time.perf_counter()
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    elapsed = time.perf_counter() - start
    assert [o.num_output_tokens for o in outputs] == [1, 2, 3]
    assert [s["decode"] for s in device.steps] == [False, True, True]
    assert elapsed >= 0.030 + 2 * 0.020, "each step's device time passed before its tokens were read"
    assert all(b["done"] >= a["done"] for a, b in zip(device.steps, device.steps[1:])), "one stream, in order"
