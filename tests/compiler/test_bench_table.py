"""`moetrt bench`'s printed summary (CPU: the table is made from the results dict alone; the measurements
themselves are tested on the GPU in tests/engines/test_cuda_runtime.py)."""

from moetrt.compiler import bench_engine


def _row(batch: int, token_ms: float, graph_ms: float) -> dict:
    return {"batch": batch, "experts_hit": 1.0, "prefill_ms": 3.0, "prefill_ratio_to_floor": 0.7,
            "decode_ms_per_token": token_ms, "ratio_to_floor": token_ms / 0.24, "decode_graph_ms": graph_ms,
            "graph_ratio_to_floor": graph_ms / 0.24, "tokens_per_s": batch / token_ms * 1e3,
            "torch_graph_ms_per_token": 2.7, "speedup_vs_torch_graph": 2.7 / token_ms, "device_bytes": None}


def test_a_host_bound_generate_gets_a_note(capsys):
    """A batch whose delivered time per token exceeds its decode graph's by more than the slack (here the
    350M bench before the plan-cache fix: 7.566 ms over 0.526) is named under the table; one within it is not."""
    results = {"device": "a GPU", "dtype": "fp16", "input_len": 128, "output_len": 32, "copy_bytes_per_s": 3e12,
               "batches": [_row(1, 7.566, 0.526), _row(8, 0.940, 0.905), _row(32, 2.003, 2.014)]}
    bench_engine._print_table(results)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, notes
    assert "at batch 1 " in notes[0] and "7.566" in notes[0] and "7.040 ms more" in notes[0]
    # the bound: slack + fraction of the graph
    graph = 1.0
    edge = graph + bench_engine.HOST_SLACK_MS + bench_engine.HOST_SLACK_FRACTION * graph
    for token_ms, noted in ((edge - 0.01, False), (edge + 0.01, True)):
        bench_engine._print_table({**results, "batches": [_row(4, token_ms, graph)]})
        assert ("note:" in capsys.readouterr().out) == noted, token_ms
