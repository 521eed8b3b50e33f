"""Traces for tests: loaded as a handler module, it sets OpenTelemetry's SDK with the in-memory exporter before
asyncnode turns traces on (which then keeps this provider), and writes each finished span as a JSON line to
``$ASYNCNODE_TEST_SPANS/<pid>.jsonl``, so that a test reads the spans of real API and worker processes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from asyncnode import TaskContext, task

EXPORTER = InMemorySpanExporter()


class _Dump(SpanProcessor):
    """After the in-memory exporter has a span, the spans it holds go to this process's file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_end(self, span: ReadableSpan) -> None:
        lines = []
        for s in EXPORTER.get_finished_spans():
            ctx, parent = s.get_span_context(), s.parent
            entry: dict[str, Any] = {"name": s.name, "kind": s.kind.name, "trace_id": f"{ctx.trace_id:032x}"}
            entry |= {"span_id": f"{ctx.span_id:016x}", "parent": f"{parent.span_id:016x}" if parent else None}
            entry |= {"attributes": dict(s.attributes or {}), "status": s.status.status_code.name}
            lines.append(json.dumps(entry))
        part = self.path.with_suffix(".part")
        part.write_text("".join(line + "\n" for line in lines))
        os.replace(part, self.path)


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
provider.add_span_processor(_Dump(Path(os.environ["ASYNCNODE_TEST_SPANS"]) / f"{os.getpid()}.jsonl"))
trace.set_tracer_provider(provider)


@task("traced", description="Open a span of its own inside the run span")
async def traced(payload: dict[str, Any], ctx: TaskContext) -> str:
    with trace.get_tracer("tests").start_as_current_span("inside"):
        return "traced"
