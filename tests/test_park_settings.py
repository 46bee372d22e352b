"""park_settings.py: what a park or wake command template may hold, and how it is filled in
(README "The sleep protocol": only {pid}, {endpoint} and {unit}, by plain replacement; a
placeholder without a value fails the step rather than run with an empty argument)."""

from backend_mgmt.park_settings import substitute, template_problems

VALUES = {"{pid}": "42", "{endpoint}": "ipc:///run/x.sock", "{unit}": "bm-x.service"}


def test_every_argument_is_checked_after_one_that_is_not_a_string():
    assert template_problems(["x", 3, "--gpu={gpu}"]) == [
        "argument 1 is not a string",
        "argument 2 ('--gpu={gpu}') has an unknown placeholder {gpu}; only {pid}, "
        "{endpoint}, {unit} are substituted"]


def test_a_template_with_several_problems_names_them_all():
    argv, why = substitute(["x", "{a}", "{b}"], VALUES)
    assert argv is None
    assert why == ("argument 1 ('{a}') has an unknown placeholder {a}; only {pid}, {endpoint}, "
                   "{unit} are substituted; argument 2 ('{b}') has an unknown placeholder "
                   "{b}; only {pid}, {endpoint}, {unit} are substituted")


def test_an_empty_value_is_no_value():
    assert substitute(["x", "--unit", "{unit}"], {**VALUES, "{unit}": ""}) == (
        None, "{unit} has no value for this backend")
    assert substitute(["x", "--pid", "{pid}"], {**VALUES, "{unit}": ""}) == (
        ["x", "--pid", "42"], None)              # unused, so not missed
