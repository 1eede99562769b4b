"""parse_score on adversarial judge outputs, and the judge templates."""
import pytest

from loop.judge import PAPER_TEMPLATE, fill_template, load_template, mean_score, parse_score


@pytest.mark.parametrize("text, expected", [
    ("Good answer.\nScore: 4", 4.0),
    ("score: 3", 3.0),
    ("SCORE:5", 5.0),
    ("Score: 3.5", 3.5),
    ("Score: 0", 0.0),
    ("First I thought Score: 2, but on reflection\nScore: 4", 4.0),  # the LAST one counts
    ("Score: 4\n...\nScore: 7", None),  # last is out of range: no score, not the earlier 4
    ("Score: 6", None),
    ("Score: -1", None),
    ("Score: 5.5", None),
    ("Score: 10/10", None),
    ("The response is fine.", None),
    ("Score:", None),
    ("Score: \n", None),
    ("Score: four", None),
    ("Score: 4 ... Score: ten", None),
    ("", None),
    ("Score：4", 4.0),  # full-width colon
    ("Score： 2.0", 2.0),
    ("Score: 4.", 4.0),  # sentence-ending period
    ("Score: 4/5", 4.0),
    ("Score: **3**", 3.0),
    ("Score: 3abc", None),
    ("Score: 4.25.", 4.25),
    ("Final Score: 2", 2.0),
    ("Score: 03", 3.0),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_parse_score_never_a_sentinel_number():
    for text in ["", "no score", "Score: x", "Score: 99"]:
        assert parse_score(text) is None
    assert mean_score([None, None]) is None
    assert mean_score([None, 4.0, 2.0]) == 3.0


def test_paper_template_exact():
    text = load_template(PAPER_TEMPLATE)
    assert text.startswith("Review the user’s question and the corresponding response using the additive 5-point")
    assert "“Score: <total points>”" in text  # curly quotes as published
    assert text.count("’") == 9 and "'" not in text
    assert text.endswith("we’ll systematically attribute points based on the outlined criteria.")


def test_fill_template_single_pass():
    out = fill_template("User: <INSTRUCTION_HERE>\n<response><RESPONSE_HERE></response>",
                        "say <RESPONSE_HERE>", "ok")
    assert out == "User: say <RESPONSE_HERE>\n<response>ok</response>"


def test_template_without_slot_rejected(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("Judge this: <INSTRUCTION_HERE>")
    with pytest.raises(ValueError, match="t.txt:1: .*RESPONSE_HERE"):
        load_template(p)
