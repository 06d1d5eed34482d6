"""Property-based fuzzing of the bridge's OpenAPI with schemathesis: no 5xx, answers valid against the schema.

Valid bodies (positive) and schema-violating ones (negative) both go to every operation.

A fixed seed (hypothesis `derandomize`) keeps `make test` repeatable; the
count per operation comes from FACEMATCH_FUZZ_EXAMPLES (`make fuzz` raises it).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as schemathesis_checks

EXAMPLES = int(os.environ.get("FACEMATCH_FUZZ_EXAMPLES", "15"))
# The bridge's own failure mode under a fuzzer is what we test; the indexer is
# real, so a reply timeout (504) would be a finding too.
CHECKS = [schemathesis_checks.not_a_server_error, schemathesis_checks.status_code_conformance,
          schemathesis_checks.content_type_conformance, schemathesis_checks.response_schema_conformance]


@pytest.fixture
def fuzz_bridge(stack: Any, sface_model_root: Path) -> str:
    """A bridge with the real SFace pack (so image routes answer) in front of a real indexer."""
    stack.env.update({"FACEMATCH_MODEL": "sface", "FACEMATCH_MODEL_ROOT": str(sface_model_root),
                      "FACEMATCH_EMBEDDING_DIM": "128"})
    stack.indexer()
    return str(stack.bridge())


def test_bridge_survives_schema_fuzzing(fuzz_bridge: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_bridge}/openapi.json")
    session = requests.Session()
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6, [op.label for op in operations]
    findings: dict[str, str] = {}
    cases = [(operation, mode) for operation in operations
             for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    for operation, mode in cases:

        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            response = case.call(base_url=fuzz_bridge, session=session, timeout=30)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS)

        try:
            fuzz()
        except Unsatisfiable:
            continue  # no schema-violating input exists for this operation (e.g. GET /health)
        except BaseException as exc:  # schemathesis raises a BaseExceptionGroup of findings
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            findings[f"{operation.label} ({mode.value})"] = str(exc)[:1500]
    total = sum(statuses.values())
    print(f"fuzz: {total} cases over {len(operations)} operations, statuses {dict(sorted(statuses.items()))}")
    assert not findings, "\n\n".join(f"{label}:\n{text}" for label, text in findings.items())
    assert total >= EXAMPLES and not any(status >= 500 for status in statuses)
