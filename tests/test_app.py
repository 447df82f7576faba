"""Page tests with Streamlit's AppTest: the app runs the real default model."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def _run(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def test_model_page_shows_summary_and_predictions():
    at = _run()
    assert not at.exception
    assert not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Layers"] == "6" and metrics["Heads"] == "4"
    preds = at.dataframe[-1].value if "prob" in at.dataframe[-1].value else at.dataframe[1].value
    assert len(preds) == 10
    assert at.query_params["model"] == ["default"] or at.query_params["model"] == "default"


def test_typed_prompt_gives_its_predictions():
    at = _run()
    at.text_area(key="prompt").input("The capital of France is").run()
    assert not at.exception
    tables = [d.value for d in at.dataframe if "prob" in d.value.columns]
    assert tables and tables[0]["token"].iloc[0] == " Paris"


def test_prompt_from_link():
    at = _run(prompt="The capital of Japan is", k="3")
    tables = [d.value for d in at.dataframe if "prob" in d.value.columns]
    assert len(tables[0]) == 3 and tables[0]["token"].iloc[0] == " Tokyo"


@pytest.mark.parametrize("model, message", [
    ("not a model!", "neither an existing folder nor a valid Hugging Face model id"),
    ("/no/such/folder", "There is no folder at"),
])
def test_bad_model_shows_error_and_app_keeps_running(model, message):
    at = _run(model=model)
    assert not at.exception
    assert any(message in e.value for e in at.error)
    assert at.title[0].value == "Model"
    assert any("Pick a model" in i.value for i in at.info)


def test_empty_prompt_is_an_error_not_a_crash():
    at = _run()
    at.text_area(key="prompt").input("   ").run()
    assert not at.exception
    assert any("The prompt is empty" in e.value for e in at.error)
