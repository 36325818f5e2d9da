"""Our request models against SGLang's own request classes, read from the released wheel.

`make test` downloads the wheel (`pip download --no-deps`, no install: it
needs a GPU stack to import) into .cache/upstream; the classes are read with
`ast`, so a field SGLang adds, renames or re-defaults fails here.
"""

import ast
import zipfile
from pathlib import Path

import pytest

from megatron_gppo.rollout import sglang_requests

ROOT = Path(__file__).resolve().parents[2]
WHEELS = sorted((ROOT / ".cache" / "upstream").glob("sglang-*.whl"))

# SamplingParams fields SGLang marks internal (filled by __post_init__ / normalize(), never sent).
INTERNAL_SAMPLING_FIELDS = {"stop_strs", "stop_regex_strs", "stop_str_max_len", "stop_regex_max_len",
                            "is_normalized", "ebnf_full_assistant"}
# Where our default differs in spelling only: SGLang's API -1 for top_k becomes its TOP_K_ALL internally.
SAME_MEANING = {("SamplingParams", "top_k"): ("TOP_K_ALL", -1)}

MIRRORS = {
    "sglang/srt/sampling/sampling_params.py": ["SamplingParams"],
    "sglang/srt/managers/io_struct.py": [
        "GenerateReqInput", "AbortReq", "PauseGenerationReqInput", "ContinueGenerationReqInput",
        "ReleaseMemoryOccupationReqInput", "ResumeMemoryOccupationReqInput", "UpdateWeightFromDiskReqInput",
        "InitWeightsUpdateGroupReqInput", "UpdateWeightsFromDistributedReqInput", "UpdateWeightsFromTensorReqInput",
        "DestroyWeightsUpdateGroupReqInput", "UpdateWeightVersionReqInput", "BeginWeightUpdateReqInput",
        "EndWeightUpdateReqInput",
    ],
}


def upstream_fields(source: str, class_name: str) -> dict[str, str | None]:
    """Field name -> default expression (None when required) of a dataclass / msgspec Struct, bases first."""
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    fields: dict[str, str | None] = {}
    for base in classes[class_name].bases:
        if isinstance(base, ast.Name) and base.id in classes:
            fields.update(upstream_fields(source, base.id))
    for stmt in classes[class_name].body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            default = stmt.value
            if isinstance(default, ast.Call) and ast.unparse(default.func) == "field":
                default = next(k.value for k in default.keywords if k.arg == "default")
            fields[stmt.target.id] = None if default is None else ast.unparse(default)
    return fields


@pytest.fixture(scope="module")
def wheel():
    if not WHEELS:
        pytest.skip("no SGLang wheel in .cache/upstream: `make test` downloads it (make upstream)")
    return zipfile.ZipFile(WHEELS[-1])


@pytest.mark.parametrize("path, class_name", [(p, c) for p, names in MIRRORS.items() for c in names])
def test_models_mirror_sglang_field_for_field(wheel, path, class_name):
    expected = upstream_fields(wheel.read(path).decode(), class_name)
    if class_name == "SamplingParams":
        expected = {k: v for k, v in expected.items() if k not in INTERNAL_SAMPLING_FIELDS}
    ours = getattr(sglang_requests, class_name).model_fields
    assert list(ours) == list(expected), f"{class_name}: fields differ from SGLang's"
    for name, default in expected.items():
        mine = ours[name].get_default() if not ours[name].is_required() else None
        if (class_name, name) in SAME_MEANING:
            assert (default, mine) == SAME_MEANING[(class_name, name)]
        elif default is None:
            assert ours[name].is_required(), f"{class_name}.{name} is required upstream"
        else:
            assert mine == _literal(default), f"{class_name}.{name}: default {mine!r}, SGLang's {default}"


def _literal(expression: str):
    try:
        return ast.literal_eval(expression)
    except ValueError:  # a module constant, e.g. DEFAULT_MAX_NEW_TOKENS
        return getattr(sglang_requests, expression)


def test_the_client_sends_what_the_models_accept():
    from megatron_gppo.rollout.protocol import generate_payload

    payload = generate_payload(prompt_ids=[1, 2], sampling_params={"max_new_tokens": 3, "sampling_seed": 7}, rid="r")
    assert payload == {"rid": "r", "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3, "sampling_seed": 7,
                                                                           "n": 1},
                       "return_logprob": True, "stream": False}
    sglang_requests.SamplingParams.model_validate(payload["sampling_params"])


@pytest.mark.parametrize("model, body, message", [
    ("InitWeightsUpdateGroupReqInput", {"master_address": "127.0.0.1"}, "missing required field 'master_port'"),
    ("PauseGenerationReqInput", {"mode": "sideways"},
     "mode must be one of 'abort', 'retract', 'in_place', got 'sideways'"),
    ("AbortReq", {"rid": 5}, "rid must be a string, got 5"),
    ("UpdateWeightsFromDistributedReqInput", {"names": ["w"], "dtypes": ["float32"], "shapes": [["x"]]},
     "shapes must be a list of lists of integers, got 'x'"),
    ("ReleaseMemoryOccupationReqInput", {"tags": "weights"}, "tags must be a list of strings, got 'weights'"),
    ("GenerateReqInput", {"text": 5}, "text must be a string or a list of them, got 5"),
])
def test_bad_bodies_are_one_line_errors(model, body, message):
    from megatron_gppo.rollout.protocol import validate

    with pytest.raises(ValueError) as error:
        validate(getattr(sglang_requests, model), body)
    assert str(error.value) == message
