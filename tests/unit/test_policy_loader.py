"""Policy files: merging (per node pack, base, extends), the shipped examples and the built-in
policy, and every problem reported at once with its file, key and rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.policy.loader import PolicyError, PolicySet, load_policy
from proxy.settings import load_settings
from proxy.settings.auth import DEFAULT_ROLES, RoleSettings
from proxy.settings.policy import PolicySettings

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(*files: str, roles: dict[str, RoleSettings] | None = None, **settings: Any) -> PolicySet:
    policy_settings = PolicySettings(files=files, **settings)
    return load_policy(policy_settings, roles if roles is not None else DEFAULT_ROLES)


def problems(*files: str, **settings: Any) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(*files, **settings)
    return info.value.problems


# -- the built-in policy and the shipped examples -------------------------------------------


def test_fresh_install_uses_the_built_in_policy() -> None:
    loaded = load_policy(PolicySettings(), DEFAULT_ROLES)
    assert loaded.sources == ("<builtin>",)
    user, viewer, power, admin = (loaded.roles[r] for r in ("user", "viewer", "power", "admin"))
    for core in ("KSampler", "CLIPTextEncode", "CheckpointLoaderSimple", "SaveImage", "UNETLoader"):
        assert user.allows_node(core), core
    for custom_or_risky in ("VHS_VideoCombine", "LoadImageSetFromFolderNode", "ModelSave"):
        assert not user.allows_node(custom_or_risky), custom_or_risky
    assert power.allows_node("ModelSave")
    assert not viewer.allows_node("KSampler")
    assert admin.unrestricted
    assert admin.allows_node("Anything")
    assert user.allows_model("sdxl/any.safetensors", ("checkpoints",))


def test_the_example_policies_load_and_say_what_their_comments_say() -> None:
    loaded = load_policy(PolicySettings(dir=str(REPO / "config" / "policies")), DEFAULT_ROLES)
    assert [Path(s).name for s in loaded.sources] == [
        "00-base.toml",
        "10-video.toml",
        "20-videohelpersuite.toml",
        "30-roles.toml",
    ]
    viewer, user, power = (loaded.roles[r] for r in ("viewer", "user", "power"))
    assert not viewer.allows_node("KSampler")
    assert user.allows_node("CLIPTextEncodeFlux")
    assert not user.allows_node("WanImageToVideo")
    assert power.allows_node("WanImageToVideo")
    assert power.allows_node("VHS_VideoCombine")
    assert not power.allows_node("VHS_LoadImagesPath")
    assert user.allows_model("sdxl/x.safetensors", ("checkpoints",))
    assert not user.allows_model("flux/x.safetensors", ("checkpoints",))  # only under unet
    assert user.allows_model("flux/x.safetensors", ("diffusion_models",))
    assert not user.allows_model("sd15/nsfw-mix.safetensors", ("checkpoints",))
    assert user.limits.max_nodes == 300
    assert loaded.roles["admin"].unrestricted
    [steps] = [b for b in power.node("KSamplerAdvanced").bounds if b.inputs == ("steps",)]
    assert steps.text == "steps <= 200"


def test_example_config_names_no_policy_files() -> None:
    settings = load_settings(REPO / "config" / "comfygate.example.toml", environ={})
    assert settings.policy.uses_builtin


# -- merging --------------------------------------------------------------------------------


def test_per_pack_files_merge_in_order(tmp_path: Path) -> None:
    core = write(
        tmp_path,
        "a.toml",
        """
        [policies.base]
        nodes.allow = ["KSampler"]
        limits = { max_nodes = 10 }
        [policies.base.bounds]
        "*" = ["steps <= 60", "batch_size <= 4"]
        """,
    )
    pack = write(
        tmp_path,
        "b.toml",
        """
        [policies.base]
        nodes.allow = ["Pack*"]
        nodes.deny = ["PackEvil"]
        limits = { max_nodes = 20 }
        [policies.base.bounds]
        "*" = ["steps <= 80"]
        """,
    )
    user = load(core, pack).roles["user"]
    assert user.allows_node("KSampler")
    assert user.allows_node("PackGood")
    assert not user.allows_node("PackEvil")
    assert user.limits.max_nodes == 20  # scalar: the later file
    assert [b.text for b in user.node("KSampler").bounds] == ["batch_size <= 4", "steps <= 80"]


def test_role_builds_on_base_and_extends(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.toml",
        """
        [policies.base]
        nodes.allow = ["Core"]
        nodes.deny = ["Banned"]
        [policies.base.bounds]
        "*" = ["steps <= 60"]
        [policies.video]
        nodes.allow = ["Wan*", "Banned"]
        [policies.power]
        extends = ["video"]
        [policies.power.bounds]
        "*" = ["steps <= 150"]
        [policies.viewer]
        use_base = false
        [policies.admin]
        unrestricted = false
        nodes.allow = ["*"]
        """,
    )
    roles = load(path).roles
    assert roles["user"].allows_node("Core")
    assert not roles["user"].allows_node("WanX")
    assert roles["power"].allows_node("WanX")
    assert roles["power"].allows_node("Core")
    assert not roles["power"].allows_node("Banned")  # the base's deny wins over any allow
    assert [b.text for b in roles["power"].node("KSampler").bounds] == ["steps <= 150"]
    assert not roles["viewer"].allows_node("Core")
    assert not roles["admin"].unrestricted  # the policy can restrict an admin role
    assert roles["admin"].allows_node("Anything")
    assert not roles["admin"].allows_node("Banned")


def test_admin_roles_are_unrestricted_by_default(tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", "[policies.base]\nnodes.allow = []\n")
    roles = {"ops": RoleSettings(admin=True), "user": RoleSettings()}
    loaded = load(path, roles=roles)
    assert loaded.roles["ops"].unrestricted
    assert not loaded.roles["user"].unrestricted


def test_defaults_from_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", "[policies.user]\nlimits = { max_nodes = 7 }\n")
    user = load(path, max_body_mb=1.5, max_string_length=99).roles["user"]
    assert (user.limits.max_nodes, user.limits.max_body_bytes) == (7, int(1.5 * 1024 * 1024))
    assert user.limits.max_string_length == 99


def test_files_by_glob_and_dir(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write(tmp_path / "d", "2.toml", '[policies.user]\nnodes.allow = ["B"]\n')
    write(tmp_path / "d", "1.toml", '[policies.user]\nnodes.allow = ["A"]\n')
    write(tmp_path / "d", "ignored.txt", "not toml")
    by_glob = load(str(tmp_path / "d" / "*.toml"))
    by_dir = load_policy(PolicySettings(dir=str(tmp_path / "d")), DEFAULT_ROLES)
    for loaded in (by_glob, by_dir):
        assert [Path(s).name for s in loaded.sources] == ["1.toml", "2.toml"]
        assert loaded.roles["user"].nodes_allow.patterns == ("A", "B")


# -- errors: all at once, each with file, key and rule --------------------------------------


def test_every_problem_is_listed_with_file_key_and_rule(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "bad.toml",
        """
        version = 2
        [policies.user]
        nodes.allow = "KSampler"
        nodes.permit = ["x"]
        models = ["*"]
        limits = { max_nodes = 0, max_body_mb = "big", speed = 1 }
        use_base = "yes"
        colour = "blue"
        extends = ["nope"]
        [policies.user.bounds]
        "*" = ["steps <=", "steps <= 60", 5]
        "KSampler" = "steps <= 60"
        [policies.usr]
        nodes.allow = ["x"]
        """,
    )
    found = problems(path)
    assert found == [
        f"{path}: version: unknown key (a policy file holds [policies.<name>])",
        f"{path}: policies.user.colour: unknown key (one of bounds, description, extends, "
        "limits, models, nodes, unrestricted, use_base)",
        f"{path}: policies.user.use_base: must be true or false",
        f"{path}: policies.user.nodes.permit: unknown key (allow, deny)",
        f"{path}: policies.user.nodes.allow: must be a list of non-empty strings",
        f"{path}: policies.user.models: must be a table with allow and/or deny lists",
        f"{path}: policies.user.limits.max_nodes: 0: must be an integer >= 1",
        f"{path}: policies.user.limits.max_body_mb: 'big': must be a number > 0",
        f"{path}: policies.user.limits.speed: unknown key (one of max_body_mb, max_nodes, "
        "max_string_length)",
        f"{path}: policies.user.bounds.\"*\"[0]: 'steps <=': the rule ends too early",
        f'{path}: policies.user.bounds."*"[2]: a rule must be a non-empty string such as '
        "'steps <= 60'",
        f'{path}: policies.user.bounds."KSampler": must be a list of rules such as ["steps <= 60"]',
        f"{path}: policies.user.extends: 'nope' is not defined",
        f"{path}: policies.usr: not a role in [roles], not the base policy ('base') and not "
        "extended by any policy (a typo?)",
    ]


def test_unreadable_files(tmp_path: Path) -> None:
    broken = write(tmp_path, "broken.toml", "[policies.user\n")
    found = problems(broken, str(tmp_path / "missing.toml"), str(tmp_path / "none-*.toml"))
    assert found[0] == f"policy.files[1]: {str(tmp_path / 'missing.toml')!r}: not found"
    assert found[1] == f"policy.files[2]: {str(tmp_path / 'none-*.toml')!r} matches no file"
    assert found[2].startswith(f"{broken}: not valid TOML: ")
    assert problems(dir=str(tmp_path / "nodir")) == [
        f"policy.dir: {str(tmp_path / 'nodir')!r}: not a directory"
    ]


def test_extends_cycle(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.toml",
        '[policies.a]\nextends = ["b"]\n[policies.b]\nextends = ["a"]\n'
        '[policies.user]\nextends = ["a"]\n',
    )
    assert problems(path) == ["policies.a.extends: cycle a -> b -> a"]


def test_base_cannot_be_a_role(tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", "[policies.user]\n")
    assert problems(path, base="user") == [
        f"{path}: policies.user: the base policy cannot also be a role"
    ]


def test_policy_error_reads_like_a_settings_error(tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", "[policies.usr]\n")
    with pytest.raises(PolicyError) as info:
        load(path)
    assert str(info.value).startswith("invalid workflow policy:\n  ")


def test_the_documented_example_loads(tmp_path: Path) -> None:
    page = (REPO / "docs" / "policy.md").read_text()
    section = page.split("## The policy language", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    loaded = load(write(tmp_path, "readme.toml", example))
    user, power, viewer = (loaded.roles[r] for r in ("user", "power", "viewer"))
    assert user.allows_node("KSamplerAdvanced")
    assert not user.allows_node("VHS_LoadVideoPath")
    assert power.allows_node("WanImageToVideo")
    assert not viewer.allows_node("KSampler")
    assert loaded.roles["admin"].unrestricted
    assert user.allows_model("sdxl/a.safetensors", ("checkpoints",))
    assert not user.allows_model("flux/a.safetensors", ("diffusion_models",))
