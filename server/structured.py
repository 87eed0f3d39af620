"""A request's structured-output fields as the grammar the fused answer must follow.

OpenAI's ``response_format`` (``json_object``, ``json_schema``) and vLLM's
``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``)
become one ``GrammarSpec``; a grammar that does not compile is a 400 naming the field.
"""

from __future__ import annotations

import json

from fusion.grammar import GrammarError, GrammarSpec, closed_schema, json_schema
from server.errors import BadRequest
from server.protocol import ResponseFormat, StructuredOutputs


def _from_structured(so: StructuredOutputs) -> GrammarSpec:
    if so.json_object is False:  # as vLLM: false asks for no constraint, which is not one
        raise BadRequest(
            "structured_outputs.json_object must be true when given",
            param="structured_outputs",
        )
    given = [
        name
        for name, value in (
            ("json", so.json_),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
            ("json_object", so.json_object),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise BadRequest(
            "structured_outputs takes exactly one of json, regex, choice, grammar, "
            f"json_object; got {', '.join(given) or 'none'}",
            param="structured_outputs",
        )
    if so.json_ is not None:
        schema = json.loads(so.json_) if isinstance(so.json_, str) else so.json_
        if not isinstance(schema, dict):
            raise BadRequest(
                "structured_outputs.json must be a JSON schema object",
                param="structured_outputs",
            )
        return json_schema(closed_schema(schema) if so.disable_additional_properties else schema)
    if so.regex is not None:
        return GrammarSpec("regex", so.regex)
    if so.choice is not None:
        return GrammarSpec("choice", json.dumps(so.choice))
    if so.grammar is not None:
        return GrammarSpec("grammar", so.grammar)
    return json_schema(None)


def grammar_of(
    response_format: ResponseFormat | None, structured: StructuredOutputs | None
) -> GrammarSpec | None:
    """The grammar a request asks for (None: free text), checked: it compiles."""
    wants_format = response_format is not None and response_format.type != "text"
    if wants_format and structured is not None:
        raise BadRequest(
            "give either response_format or structured_outputs, not both",
            param="structured_outputs",
        )
    param = "structured_outputs"
    try:
        if structured is not None:
            spec = _from_structured(structured)
        elif response_format is None or response_format.type == "text":
            return None
        else:
            param = "response_format"
            spec = _from_format(response_format)
        _ = spec.compiled
    except json.JSONDecodeError as exc:
        raise BadRequest(f"structured_outputs.json is not JSON: {exc}", param=param) from None
    except GrammarError as exc:
        raise BadRequest(str(exc), param=param) from None
    return spec


def _from_format(rf: ResponseFormat) -> GrammarSpec:
    if rf.type == "json_object":
        return json_schema(None)
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise BadRequest(
            "response_format of type json_schema needs json_schema.schema",
            param="response_format",
        )
    return json_schema(rf.json_schema.schema_)
