"""``check_workflow``: every violation type, globs, deny over allow, linked vs literal inputs,
several roles, and the exact ``node_errors`` a refusal renders."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.isolation.prompt import Violation
from proxy.policy.checker import (
    VIOLATION_TYPES,
    as_number,
    check_workflow,
    path_problem,
    ui_node_types,
)
from proxy.policy.model import RolePolicy
from proxy.policy.refusal import PolicyRejected
from proxy.policy.store import PolicyStore
from proxy.settings.auth import DEFAULT_ROLES
from proxy.settings.policy import PolicySettings

POLICY = """
[policies.base]
nodes.allow = [
    "KSampler*", "CLIPTextEncode", "CheckpointLoaderSimple", "LoraLoader", "EmptyLatentImage",
    "SaveImage", "PrimitiveInt", "PrimitiveString", "VAEDecode", "LoadImage", "Custom*",
    "MyLoader",
]
nodes.deny = ["KSamplerDangerous", "Custom*Evil"]
models.allow = ["sd15/*", "loras:styles/*"]
models.deny = ["*nsfw*"]
limits = { max_nodes = 12, max_body_mb = 0.01, max_string_length = 50 }

[policies.base.bounds]
"*" = ["steps <= 60", "width * height <= 1024 * 1024", "batch_size <= 4", "denoise in [0, 1]"]
"KSamplerAdvanced" = ["steps <= 100"]
"CLIPTextEncode" = ["len(text) <= 100"]

[policies.power]
nodes.allow = ["PowerNode"]
models.allow = ["*"]

[policies.power.bounds]
"*" = ["steps <= 150"]
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> PolicyStore:
    path = tmp_path_factory.mktemp("policy") / "policy.toml"
    path.write_text(POLICY)
    return PolicyStore(PolicySettings(files=(str(path),)), DEFAULT_ROLES)


@pytest.fixture(scope="module")
def user(store: PolicyStore) -> RolePolicy:
    return store.for_roles({"user"})


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


CKPT = node("CheckpointLoaderSimple", ckpt_name="sd15/dream.safetensors")
Finding = tuple[str, str, str]
"""(node id, error type, input name) of one violation."""


def findings(violations: list[Violation]) -> list[Finding]:
    return [(v.node_id, v.error_type, v.input_name) for v in violations]


CASES: list[tuple[str, dict[str, Any], list[Finding]]] = [
    ("allowed", {"1": CKPT, "2": node("KSampler", steps=60, denoise=1, model=["1", 0])}, []),
    # -- node types: globs, deny wins, no allow = nothing -----------------------------------
    ("glob allow", {"1": node("KSamplerAdvanced", steps=100)}, []),
    ("not allowed", {"1": node("EvilNode")}, [("1", "node_not_allowed", "")]),
    ("deny wins", {"1": node("KSamplerDangerous")}, [("1", "node_not_allowed", "")]),
    ("deny glob", {"1": node("CustomVeryEvil")}, [("1", "node_not_allowed", "")]),
    ("allow glob", {"1": node("CustomGood")}, []),
    ("case sensitive", {"1": node("ksampler")}, [("1", "node_not_allowed", "")]),
    # -- bounds: literal vs linked ------------------------------------------------------------
    ("steps over", {"1": node("KSampler", steps=61)}, [("1", "input_out_of_bounds", "steps")]),
    (
        "steps as string",
        {"1": node("KSampler", steps="61")},
        [("1", "input_out_of_bounds", "steps")],
    ),
    (
        "steps as float",
        {"1": node("KSampler", steps=60.5)},
        [("1", "input_out_of_bounds", "steps")],
    ),
    ("not a number", {"1": node("KSampler", steps="many")}, []),  # ComfyUI refuses it itself
    (
        "specific beats *",
        {"1": node("KSamplerAdvanced", steps=101)},
        [("1", "input_out_of_bounds", "steps")],
    ),
    (
        "denoise low",
        {"1": node("KSampler", denoise=-0.1)},
        [("1", "input_out_of_bounds", "denoise")],
    ),
    (
        "denoise NaN",
        {"1": node("KSampler", denoise="nan")},
        [("1", "input_out_of_bounds", "denoise")],
    ),
    (
        "product",
        {"1": node("EmptyLatentImage", width=2048, height=1024)},
        [("1", "input_out_of_bounds", "width")],
    ),
    ("product ok", {"1": node("EmptyLatentImage", width=2048, height=512, batch_size=4)}, []),
    (
        "product half linked",
        {
            "1": node("EmptyLatentImage", width=["2", 0], height=4096),
            "2": node("KSampler"),
        },
        [],
    ),
    ("linked not bounded", {"1": node("KSampler", steps=["2", 0]), "2": node("KSampler")}, []),
    (
        "primitive followed",
        {
            "1": node("KSampler", steps=["2", 0]),
            "2": node("PrimitiveInt", value=999),
        },
        [("1", "input_out_of_bounds", "steps")],
    ),
    ("missing input", {"1": node("EmptyLatentImage", width=4096)}, []),
    # -- strings -------------------------------------------------------------------------------
    (
        "default cap",
        {"1": node("SaveImage", filename_prefix="x" * 51)},
        [("1", "string_too_long", "filename_prefix")],
    ),
    ("own cap", {"1": node("CLIPTextEncode", text="x" * 100)}, []),
    (
        "own cap over",
        {"1": node("CLIPTextEncode", text="x" * 101)},
        [("1", "string_too_long", "text")],
    ),
    # -- models ---------------------------------------------------------------------------------
    (
        "model not allowed",
        {"1": node("CheckpointLoaderSimple", ckpt_name="sdxl/x.safetensors")},
        [("1", "model_not_allowed", "ckpt_name")],
    ),
    (
        "model denied",
        {"1": node("CheckpointLoaderSimple", ckpt_name="sd15/nsfw.safetensors")},
        [("1", "model_not_allowed", "ckpt_name")],
    ),
    ("model windows sep", {"1": node("CheckpointLoaderSimple", ckpt_name="sd15\\a.ckpt")}, []),
    ("folder pattern", {"1": node("LoraLoader", lora_name="styles/ink.safetensors")}, []),
    (
        "folder pattern elsewhere",
        {"1": node("CheckpointLoaderSimple", ckpt_name="styles/ink.safetensors")},
        [("1", "model_not_allowed", "ckpt_name")],
    ),
    (
        "custom loader",
        {"1": node("MyLoader", model_name="other/x.gguf")},
        [("1", "model_not_allowed", "model_name")],
    ),
    ("not a model file", {"1": node("MyLoader", model_name="gpt-4o")}, []),
    (
        "linked model",
        {"1": node("LoraLoader", lora_name=["2", 0]), "2": node("CustomSwitch")},
        [("1", "model_not_allowed", "lora_name")],
    ),
    # -- paths ----------------------------------------------------------------------------------
    ("subfolder ok", {"1": node("LoadImage", image="sub/dir/a.png")}, []),
    (
        "dotdot",
        {"1": node("LoadImage", image="../secret.png")},
        [("1", "path_not_allowed", "image")],
    ),
    (
        "absolute",
        {"1": node("CustomGood", model_path="/etc/passwd")},
        [("1", "path_not_allowed", "model_path")],
    ),
    ("drive", {"1": node("CustomGood", file="C:\\x.png")}, [("1", "path_not_allowed", "file")]),
    (
        "NUL",
        {"1": node("CustomGood", filename="a\x00.png")},
        [("1", "path_not_allowed", "filename")],
    ),
    (
        "backslash dotdot",
        {"1": node("CustomGood", name="a\\..\\..\\x.safetensors")},
        [
            ("1", "path_not_allowed", "name"),
            ("1", "model_not_allowed", "name"),
        ],
    ),
    ("prose is not a path", {"1": node("CLIPTextEncode", text="a cat.. /dog ../")}, []),
    (
        "media-looking value",
        {"1": node("CustomGood", source="../../x.png")},
        [("1", "path_not_allowed", "source")],
    ),
    (
        "path through primitive",
        {
            "1": node("CustomGood", folder=["2", 0]),
            "2": node("PrimitiveString", value="/srv"),
        },
        [("1", "path_not_allowed", "folder")],
    ),
    (
        "path on forbidden node",
        {"1": node("EvilNode", path="/x")},
        [
            ("1", "node_not_allowed", ""),
            ("1", "path_not_allowed", "path"),
        ],
    ),
    # -- graph ----------------------------------------------------------------------------------
    ("missing node", {"1": node("VAEDecode", samples=["9", 0])}, [("1", "bad_link", "samples")]),
    ("negative index", {"1": node("VAEDecode", samples=["1", -1])}, [("1", "bad_link", "samples")]),
    (
        "bool index",
        {"2": CKPT, "1": node("VAEDecode", vae=["2", True])},
        [("1", "bad_link", "vae")],
    ),
    ("three items", {"1": node("VAEDecode", samples=["1", 0, 0])}, [("1", "bad_link", "samples")]),
    ("int node id", {"1": CKPT, "2": node("VAEDecode", vae=[1, 2])}, [("2", "bad_link", "vae")]),
    (
        "cycle",
        {
            "1": node("VAEDecode", samples=["2", 0]),
            "2": node("VAEDecode", samples=["3", 0]),
            "3": node("VAEDecode", samples=["1", 0]),
            "4": node("VAEDecode", samples=["1", 0]),
        },
        [("1", "cycle", ""), ("2", "cycle", ""), ("3", "cycle", "")],
    ),
    ("self loop", {"1": node("VAEDecode", samples=["1", 0])}, [("1", "cycle", "")]),
    (
        "diamond is no cycle",
        {
            "1": CKPT,
            "2": node("VAEDecode", vae=["1", 2]),
            "3": node("VAEDecode", vae=["1", 2]),
            "4": node("SaveImage", images=["2", 0], more=["3", 0]),
        },
        [],
    ),
    ("no class_type", {"1": {"inputs": {}}}, [("1", "invalid_node", "")]),
    ("node not an object", {"1": []}, [("1", "invalid_node", "")]),
    (
        "inputs not an object",
        {"1": {"class_type": "KSampler", "inputs": []}},
        [("1", "invalid_node", "")],
    ),
    (
        "too many nodes",
        {str(i): node("KSampler", steps=999) for i in range(13)},
        [("", "too_many_nodes", "")],
    ),
    ("ui format", {"nodes": [], "links": [], "version": 0.4}, [("", "ui_format_workflow", "")]),
    (
        "every violation at once",
        {
            "1": node("EvilNode"),
            "2": node("KSampler", steps=61, denoise=2),
            "3": node("VAEDecode", samples=["99", 0]),
        },
        [
            ("1", "node_not_allowed", ""),
            ("2", "input_out_of_bounds", "steps"),
            ("2", "input_out_of_bounds", "denoise"),
            ("3", "bad_link", "samples"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("workflow", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_violations(workflow: dict[str, Any], expected: list[Finding], user: RolePolicy) -> None:
    assert sorted(findings(check_workflow(workflow, user))) == sorted(expected)


def test_every_type_is_covered_by_the_table() -> None:
    covered = {f[1] for _, _, expected in CASES for f in expected} | {"body_too_large"}
    assert covered == set(VIOLATION_TYPES)


def test_body_size(user: RolePolicy) -> None:
    limit = user.max_body_bytes
    assert check_workflow({}, user, body_size=limit) == []
    assert findings(check_workflow({}, user, body_size=limit + 1)) == [("", "body_too_large", "")]


@pytest.mark.parametrize("not_a_graph", [None, [], "x", 3])
def test_not_a_graph_is_left_to_comfyui(not_a_graph: object, user: RolePolicy) -> None:
    assert check_workflow(not_a_graph, user) == []


def test_output_indexes_checked_when_known(user: RolePolicy) -> None:
    workflow = {"1": CKPT, "2": node("VAEDecode", vae=["1", 3])}
    assert check_workflow(workflow, user) == []  # unknown output count: only >= 0
    counts = {"CheckpointLoaderSimple": 3}
    assert findings(check_workflow(workflow, user, output_counts=counts)) == [
        ("2", "bad_link", "vae")
    ]
    workflow["2"]["inputs"]["vae"] = ["1", 2]
    assert check_workflow(workflow, user, output_counts=counts) == []
    loop = {"1": node("VAEDecode", samples=["2", 0]), "2": node("VAEDecode", samples=["1", 0])}
    found = check_workflow(loop, user, output_counts={"VAEDecode": 1})
    assert findings(found) == [("1", "cycle", ""), ("2", "cycle", "")]


def test_isolation_judges_its_own_file_inputs(user: RolePolicy) -> None:
    workflow = {
        "1": node("LoadImage", image="../x.png"),
        "2": node("SaveImage", filename_prefix="../up"),
        "3": node("CustomGood", model_path="/etc"),
    }
    assert findings(check_workflow(workflow, user, isolation_checks_files=True)) == [
        ("3", "path_not_allowed", "model_path")
    ]


def test_unrestricted_finds_nothing(store: PolicyStore) -> None:
    admin = store.for_roles({"admin"})
    assert admin.unrestricted
    assert check_workflow({"1": node("EvilNode", path="/x")}, admin, body_size=10**9) == []


def test_several_roles_most_generous_per_node(store: PolicyStore) -> None:
    both = store.for_roles({"user", "power"})
    workflow = {
        "1": node("KSampler", steps=100),  # over user's 60, within power's 150
        "2": node("PowerNode"),  # only power allows it
        "3": node("KSampler", steps=151),  # over both: reported with the first role's rule
        "4": node("CheckpointLoaderSimple", ckpt_name="any/where.safetensors"),  # power: "*"
    }
    violations = check_workflow(workflow, both)
    assert findings(violations) == [("3", "input_out_of_bounds", "steps")]
    assert violations[0].details == "steps <= 150"  # power's rule: the first role is power
    assert both.key == "power+user"


def test_exact_node_errors_in_comfyui_shape(user: RolePolicy) -> None:
    workflow = {
        "5": node("EvilNode"),
        "6": node("KSampler", steps=61, seed=1),
        "7": node("EmptyLatentImage", width=2048, height=2048, batch_size=1),
    }
    refusal = PolicyRejected(check_workflow(workflow, user, body_size=10**6))
    assert refusal.status == 400
    assert refusal.error_type == "body_too_large"
    assert refusal.message == "Prompt refused by the workflow policy (4 problems)"
    assert refusal.node_errors == {
        "5": {
            "errors": [
                {
                    "type": "node_not_allowed",
                    "message": "your role may not use EvilNode nodes",
                    "details": "not among the node types your role may use",
                    "extra_info": {},
                }
            ],
            "dependent_outputs": [],
            "class_type": "EvilNode",
        },
        "6": {
            "errors": [
                {
                    "type": "input_out_of_bounds",
                    "message": "steps = 61 is out of bounds for your role (steps <= 60)",
                    "details": "steps <= 60",
                    "extra_info": {"input_name": "steps", "received_value": 61},
                }
            ],
            "dependent_outputs": [],
            "class_type": "KSampler",
        },
        "7": {
            "errors": [
                {
                    "type": "input_out_of_bounds",
                    "message": "width = 2048, height = 2048 is out of bounds for your role "
                    "(width * height <= 1024 * 1024)",
                    "details": "width * height <= 1024 * 1024",
                    "extra_info": {"input_name": "width", "received_value": [2048, 2048]},
                }
            ],
            "dependent_outputs": [],
            "class_type": "EmptyLatentImage",
        },
    }
    assert refusal.details.splitlines() == [
        "the request body is 1000000 bytes; your role's limit is 10485 bytes",
        "node 5 (EvilNode): your role may not use EvilNode nodes",
        "node 6 (KSampler) input steps: steps = 61 is out of bounds for your role (steps <= 60)",
        "node 7 (EmptyLatentImage) input width: width = 2048, height = 2048 is out of bounds for "
        "your role (width * height <= 1024 * 1024)",
    ]


def test_long_values_are_not_echoed_whole(user: RolePolicy) -> None:
    [violation] = check_workflow({"1": node("SaveImage", filename_prefix="y" * 5000)}, user)
    assert isinstance(violation.received_value, str)
    assert len(violation.received_value) < 200


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("sdxl/model.safetensors", None),
        ("sdxl\\model.safetensors", None),
        ("a..b.png", None),
        ("..", "'..'"),
        ("a/../b", "'..'"),
        ("a\\..\\b", "'..'"),
        ("/abs", "absolute"),
        ("\\\\server\\share", "absolute"),
        ("c:x", "drive"),
        ("D:/x", "drive"),
        ("x\x00y", "NUL"),
    ],
)
def test_path_problem(value: str, problem: str | None) -> None:
    found = path_problem(value)
    assert (found is None) if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (3, 3),
        (2.5, 2.5),
        (True, 1),
        ("60", 60),
        (" 7 ", 7),
        ("0.5", 0.5),
        ("x", None),
        (None, None),
    ],
)
def test_numbers_read_like_comfyui(value: object, number: float | None) -> None:
    assert as_number(value) == number


def test_built_in_policy_on_a_default_workflow() -> None:
    """The fresh-install policy accepts the stock frontend's default SD1.5 graph for a user."""
    store = PolicyStore(PolicySettings(), DEFAULT_ROLES)
    default = {
        "3": node("KSampler", seed=1, steps=20, cfg=8, sampler_name="euler", scheduler="normal",
                  denoise=1, model=["4", 0], positive=["6", 0], negative=["7", 0],
                  latent_image=["5", 0]),
        "4": node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly-fp16.safetensors"),
        "5": node("EmptyLatentImage", width=512, height=512, batch_size=1),
        "6": node("CLIPTextEncode", text="a bottle", clip=["4", 1]),
        "7": node("CLIPTextEncode", text="text, watermark", clip=["4", 1]),
        "8": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
        "9": node("SaveImage", filename_prefix="ComfyUI", images=["8", 0]),
    }  # fmt: skip
    assert check_workflow(default, store.for_roles({"user"})) == []
    assert findings(check_workflow(default, store.for_roles({"viewer"}))) == [
        (n, "node_not_allowed", "") for n in default
    ]


def test_node_without_class_type_is_named_from_the_ui_workflow(user: RolePolicy) -> None:
    """The stock frontend drops the class_type of a node type missing from its node library
    (hidden from this role by the catalog); the attached UI workflow still names it."""
    body = {
        "prompt": {"3": {"inputs": {"image": ["1", 0]}}, "1": node("EmptyLatentImage")},
        "extra_data": {
            "extra_pnginfo": {"workflow": {"nodes": [{"id": 3, "type": "EvilNode"}, {"id": 1}]}}
        },
    }
    ui_types = ui_node_types(body)
    assert ui_types == {"3": "EvilNode"}
    [violation] = check_workflow(body["prompt"], user, ui_types=ui_types)
    assert (violation.node_id, violation.class_type) == ("3", "EvilNode")
    assert violation.error_type == "node_not_allowed"
    [violation] = check_workflow(body["prompt"], user, ui_types={"3": "KSampler"})
    assert violation.error_type == "invalid_node"
    assert violation.message == "the node has no class_type: is KSampler installed on the server?"
    assert ui_node_types({"extra_data": {"extra_pnginfo": "x"}}) == {}


def test_node_not_allowed_says_whether_it_was_denied(user: RolePolicy) -> None:
    denied, unlisted = check_workflow({"1": node("KSamplerDangerous"), "2": node("Unknown")}, user)
    assert denied.details == "denied by the policy"
    assert unlisted.details == "not among the node types your role may use"
