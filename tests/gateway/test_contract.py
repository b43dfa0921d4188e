"""Contract test: schemathesis generates requests from the gateway's own /openapi.json and sends them
over real HTTP to the gateway in front of real retrieval + ranking servers. Every response must be
documented (status, content type, headers) and match its schema; no 5xx other than the documented
503/504 (a generated timeout_ms of a few ms is a legitimate 504); bad input must be refused 4xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import CheckContext
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

EXAMPLES_PER_OPERATION = 25


def no_undocumented_server_error(ctx: CheckContext, response, case) -> bool | None:
    if response.status_code >= 500 and response.status_code not in (503, 504):
        raise AssertionError(f"{case.method} {case.formatted_path} answered {response.status_code}: "
                             f"{response.text[:300]}")
    return None


OPERATIONS = [("/v1/users/{user_id}/recommendations", "GET"), ("/v1/rank", "POST"), ("/v1/interactions", "POST"),
              ("/healthz", "GET"), ("/readyz", "GET")]
WITHOUT_INPUT = {("/healthz", "GET")}     # nothing to get wrong: no negative cases exist
CHECKS = [no_undocumented_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(stack):
    return schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")


def test_the_document_lists_every_operation(api_schema):
    assert sorted((o.ok().path, o.ok().method.upper()) for o in api_schema.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path, method", OPERATIONS)
def test_every_response_matches_the_contract(api_schema, path, method, mode):
    if mode == GenerationMode.NEGATIVE and (path, method) in WITHOUT_INPUT:
        pytest.skip("the operation takes no input")
    operation = api_schema[path][method]
    # negative cases (data the schema refuses) must also be refused: 4xx, never passed on to ranking
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def exchange(case):
        case.call_and_validate(checks=checks)

    exchange()
