"""The data-version name rule (orchestrator.model.versions) and its use by pipeline definitions."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator.engine.errors import InvalidInput
from orchestrator.engine.runs import check_versions
from orchestrator.model import PipelineDefinition
from orchestrator.model.versions import MAX_VERSIONS, is_version_name, version_list_problems

GOOD = ["default", "15.1.0", "2024-01-01", "v1", "a:b_c-d.e", "0", "X" * 128, "1..2"]
BAD = ["", ".", "..", ".hidden", "_x", "-x", ":x", "*", "a*", "a/b", "../x", "v1\n", "v1 ", " v1", "a b", "\t",
       "x" * 129, "é", "a\\b", "a%2F"]


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name: str) -> None:
    assert is_version_name(name)
    assert version_list_problems([name]) == []


@pytest.mark.parametrize("name", BAD)
def test_bad_names(name: str) -> None:
    assert not is_version_name(name)
    [(path, message)] = version_list_problems(["ok", name])
    assert path == "versions[1]" and repr(name)[:20] in message


def test_list_rules() -> None:
    assert version_list_problems([]) == [("versions", version_list_problems([])[0][1])]
    assert version_list_problems(["a", "b", "a"]) == [
        ("versions[2]", "version 'a' is listed more than once (first at versions[0])")]
    assert version_list_problems([f"v{i}" for i in range(MAX_VERSIONS)]) == []
    [(path, message)] = version_list_problems([f"v{i}" for i in range(MAX_VERSIONS + 1)])
    assert path == "versions" and str(MAX_VERSIONS) in message
    assert not is_version_name(1) and "must be a string" in version_list_problems([1])[0][1]


def test_the_engine_check_names_value_and_path() -> None:
    check_versions(None)
    with pytest.raises(InvalidInput) as refused:
        check_versions(["ok", ".."])
    assert refused.value.message.startswith("versions[1]: '..' is not a valid version name")
    assert refused.value.details == [{"path": "versions[1]", "message": refused.value.message[len("versions[1]: "):]}]
    with pytest.raises(InvalidInput) as many:
        check_versions(["*"] * 500)
    assert "(and 490 more)" in many.value.message and len(many.value.details) == 100


def _definition(versions: Any) -> dict[str, Any]:
    return {"id": "p", "versions": versions, "nodes": [{"id": "a", "task": "echo"}]}


@pytest.mark.parametrize("name", BAD)
def test_definitions_use_the_same_rule(name: str) -> None:
    with pytest.raises(ValidationError) as exc:
        PipelineDefinition.model_validate(_definition(["ok", name]))
    (error,) = exc.value.errors(include_url=False)
    assert error["loc"] == ("versions", 1) and "is not a valid version name" in error["msg"]


def test_definitions_refuse_repeats_and_too_many_naming_the_index() -> None:
    with pytest.raises(ValidationError, match=r"versions\[1\]: version 'x' is listed more than once"):
        PipelineDefinition.model_validate(_definition(["x", "x"]))
    with pytest.raises(ValidationError, match=f"at most {MAX_VERSIONS} versions"):
        PipelineDefinition.model_validate(_definition([f"v{i}" for i in range(MAX_VERSIONS + 1)]))
    assert PipelineDefinition.model_validate(_definition(GOOD)).versions == GOOD
