"""The MQTT cloud folds updates in as they arrive (cloud/streaming.py); whatever the order of
arrival, the round's result must equal the simulator's ``strategy.aggregate`` on the list."""

import pytest
import torch
from test_strategies import MODEL, fresh_state, update

from cloud.strategies import build_strategy
from cloud.streaming import StreamingAggregate

PARTICIPANTS = [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (5, 3)]


@pytest.mark.parametrize("name,options", [
    ("depthwise", {}), ("fedavg", {}), ("heterofl", {}), ("scalefl", {}),
    ("hypemefed-release", {}),
    ("hypemefed", {"generate": "convs"}), ("hypemefed", {"generate": "convs+bn"}),
    ("hypemefed", {"generate": "all"}), ("hypemefed", {"untrained": "global"}),
    ("hypemefed", {"residual": True, "untrained": "global"}),
])
def test_streaming_equals_aggregate_in_any_arrival_order(name, options):
    simulator, cloud = (build_strategy(name, MODEL, seed=3, **options) for _ in range(2))
    g = fresh_state(0)
    updates = [update(simulator, g, c, t, 20 + c) for c, t in PARTICIPANTS
               if simulator.tasks([(c, t)])]
    expected, metrics = simulator.aggregate(g, updates, 1)
    stream = StreamingAggregate(cloud, g, [u.task.client for u in updates])
    for i in torch.randperm(len(updates), generator=torch.Generator().manual_seed(1)).tolist():
        stream.add(updates[i])
    assert not stream.full  # folded in on arrival, not held as a list
    got, stream_metrics = stream.finish(1)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
    if name == "hypemefed":
        assert stream_metrics["generated_tensors"] == metrics["generated_tensors"] > 0
        assert stream_metrics["hypernet_pairs"] == metrics["hypernet_pairs"]
