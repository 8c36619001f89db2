"""Which trace contexts are W3C's: what a client may pass, and what the sidecar keeps."""

from __future__ import annotations

import pytest

from dtfx.core.history import MAX_TRACE_STATE, TraceContext, trace_context_problem

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    "context",
    [
        TraceContext(trace_parent=PARENT),
        TraceContext(trace_parent=PARENT, trace_state="rojo=00f067aa0ba902b7", span_id="b7ad6b7169203331"),
        TraceContext(trace_parent=PARENT, trace_state="k=" + "v" * (MAX_TRACE_STATE - 2)),
        TraceContext(trace_parent="01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more"),  # a later version
    ],
)
def test_w3c_trace_contexts(context: TraceContext) -> None:
    assert trace_context_problem(context) is None


@pytest.mark.parametrize(
    ("context", "complaint"),
    [
        (TraceContext(trace_parent=""), "not a W3C traceparent"),
        (TraceContext(trace_parent="hello"), "not a W3C traceparent"),
        (TraceContext(trace_parent=PARENT.upper()), "not a W3C traceparent"),
        (TraceContext(trace_parent=PARENT + "-more"), "not a W3C traceparent"),  # version 00 has four fields
        (TraceContext(trace_parent="ff" + PARENT[2:]), "not a W3C traceparent"),
        (TraceContext(trace_parent="01" + PARENT[2:] + "-" + "x" * 300), "not a W3C traceparent"),
        (TraceContext(trace_parent="00-" + "0" * 32 + "-b7ad6b7169203331-01"), "all-zero"),
        (TraceContext(trace_parent="00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01"), "all-zero"),
        (TraceContext(trace_parent=PARENT, trace_state="k=" + "v" * MAX_TRACE_STATE), "longer than 512"),
        (TraceContext(trace_parent=PARENT, span_id="not-a-span"), "span_id"),
    ],
)
def test_what_is_no_w3c_trace_context(context: TraceContext, complaint: str) -> None:
    problem = trace_context_problem(context)
    assert problem is not None and complaint in problem
