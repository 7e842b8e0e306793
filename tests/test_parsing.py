"""Code-block and final-answer extraction from root replies."""

from rlm.parsing import FinalInText, find_code_blocks, find_final_in_text


def test_repl_and_python_blocks_are_found_in_order() -> None:
    text = "look first\n```repl\nprint(1)\n```\nthen\n```python\nprint(2)\n```\n"
    assert find_code_blocks(text) == ["print(1)\n", "print(2)\n"]


def test_unlabelled_fence_is_used_only_when_nothing_is_labelled() -> None:
    assert find_code_blocks("```\nx = 1\n```") == ["x = 1\n"]
    assert find_code_blocks("```\nnot code\n```\n```repl\nx = 2\n```") == ["x = 2\n"]


def test_other_languages_are_not_code() -> None:
    assert find_code_blocks("```json\n{\"a\": 1}\n```") == []


def test_final_in_prose() -> None:
    assert find_final_in_text("Done.\nFINAL(42 apples)") == FinalInText("FINAL", "42 apples")
    assert find_final_in_text('FINAL("quoted")') == FinalInText("FINAL", "quoted")


def test_final_var_in_prose() -> None:
    assert find_final_in_text("FINAL_VAR(answer)") == FinalInText("FINAL_VAR", "answer")


def test_final_inside_code_is_not_a_text_final() -> None:
    assert find_final_in_text("```repl\nFINAL(x)\n```") is None


def test_a_mention_mid_sentence_is_not_a_final() -> None:
    assert find_final_in_text("I will call FINAL(x) once I know x.") is None
