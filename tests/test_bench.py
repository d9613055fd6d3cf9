"""The benchmark harness (jaxsparse.bench): batch sizing, interleaved medians, result files.

Timing is checked against a fake clock that the timed functions advance, so nothing here depends
on the speed of the machine.
"""

import json

import pytest

import jaxsparse.bench as bench


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(bench, "perf_counter", c)
    return c


def costing(clock, first_s, then_s, extra=None):
    """A function whose first call (compilation) costs first_s and every later one then_s, plus
    extra[i] seconds on call i."""
    calls = []

    def fn():
        clock.now += (first_s if not calls else then_s) + (extra or {}).get(len(calls), 0.0)
        calls.append(None)
    fn.calls = calls
    return fn


def test_timer_sizes_batches_on_a_compiled_call(clock):
    """A 10 s first call (compilation) must not shrink the batch: 2 ms / 0.1 ms = 20 calls, after
    one untimed call (the third call, 5 ms slower here) that the sample does not count."""
    fn = costing(clock, 10.0, 1e-4, extra={2: 5e-3})
    timer = bench.Timer(fn, (), min_sample_s=2e-3)
    assert timer.inner == 20
    assert timer.sample() == pytest.approx(1e-4)
    assert len(fn.calls) == 2 + 1 + 20


def test_timer_long_calls_are_not_doubled(clock):
    """Calls as long as a sample: one per sample, no untimed call before it."""
    fn = costing(clock, 10.0, 1.0)
    timer = bench.Timer(fn, ())
    assert timer.inner == 1
    n = len(fn.calls)
    assert timer.sample() == pytest.approx(1.0)
    assert len(fn.calls) == n + 1


def test_time_interleaved_medians_in_ms(clock):
    """Medians of the samples in ms; one slow call (the 6th of "a") does not move them."""
    a, b = costing(clock, 1e-3, 1e-3, extra={5: 4e-3}), costing(clock, 3e-3, 3e-3)
    out = bench.time_interleaved({"a": (a, ()), "b": (b, ())}, reps=5)
    assert out == {"a": pytest.approx(1.0), "b": pytest.approx(3.0)}
    # compile and size, then per sample one untimed call and a 10 ms batch
    assert len(a.calls) == 2 + 5 * (1 + 10) and len(b.calls) == 2 + 5 * (1 + 3)


def test_time_interleaved_varies_the_order(clock):
    """No method always runs right after the same other one."""
    log = []
    methods = {}
    for name in "abcd":
        def fn(name=name):
            clock.now += 1.0
            log.append(name)
        methods[name] = (fn, ())
    bench.time_interleaved(methods, reps=12)
    timed = log[2 * len(methods):]  # after compiling and sizing each
    predecessors = {name: {p for p, q in zip(timed, timed[1:]) if q == name and p != name}
                    for name in methods}
    assert all(len(p) >= 2 for p in predecessors.values()), predecessors


def test_write_results(tmp_path):
    cases = [bench.Case("spmm", "3072x768", {"n": 128}, {"jaxsparse": 1.0, "dense": 4.0}),
             bench.Case("spmm", "768x768", {"n": 1}, {"jaxsparse": 2.0})]
    info = {"cpu": "test cpu", "cores": 2, "isa": ["avx2"], "jax": "0", "date": "today",
            "command": "python -m jaxsparse.bench cpu"}
    paths = bench.write_results("cpu", cases, ["jaxsparse", "dense"], tmp_path, info,
                                summary=["- a summary line"])
    md = paths["md"].read_text()
    assert "test cpu, 2 cores (avx2)" in md and "- a summary line" in md
    assert "| spmm | 3072x768 | 1.000 | 4.000 | **4.00** |" in md
    assert "| spmm | 768x768 | 2.000 | - | - |" in md
    data = json.loads(paths["json"].read_text())
    assert data["cases"][0]["speedup"] == {"jaxsparse": 4.0, "dense": 1.0}
    assert data["cases"][1]["speedup"] == {"jaxsparse": None}
