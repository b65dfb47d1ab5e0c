import pytest

from batos import personas


def test_four_personas_with_roles_and_prompts():
    assert set(personas.PERSONAS) == {"ALFRED", "BABS", "BRICK", "ROBIN"}
    assert set(personas.ROLES) == set(personas.PERSONAS)
    for name, prompt in personas.PERSONAS.items():
        assert prompt.startswith(f"You are {name}")
    assert "audit" in personas.PERSONAS["ALFRED"]
    assert "curate" in personas.PERSONAS["BABS"]
    assert "code" in personas.PERSONAS["BRICK"]
    assert "Architect" in personas.PERSONAS["ROBIN"]
    assert personas.DEFAULT_PERSONA in personas.PERSONAS


@pytest.mark.parametrize("name", ["brick", " Brick ", "BRICK"])
def test_normalize_accepts_any_case(name):
    assert personas.normalize(name) == "BRICK"


@pytest.mark.parametrize("name", ["JOKER", "", None, 3, "BRICKS"])
def test_unknown_persona_is_refused_with_the_valid_names(name):
    with pytest.raises(personas.UnknownPersona, match="ALFRED, BABS, BRICK, ROBIN"):
        personas.normalize(name)


def test_with_system_prompt_puts_one_system_message_first():
    out = personas.with_system_prompt(
        "babs",
        [
            {"role": "user", "content": "q1"},
            {"role": "system", "content": "Context: X"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
        ],
    )
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith(personas.PERSONAS["BABS"])
    assert out[0]["content"].endswith("Context: X")
    assert [m["content"] for m in out[1:]] == ["q1", "a1", "q2"]
